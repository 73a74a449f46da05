"""Weak-model wrong-solution pool preparation (METHOD.md section 1), resumable.

    problems.parquet ──weak model, n samples──> verifier ──> problems.with_wrong_boxed.parquet
                                                          + <stem>.prepare/rollouts.jsonl
                                                          + <stem>.prepare/summary.json

A sample enters a problem's pool (`wrong_answer_with_boxed`, list<string>, full decoded texts in
sample order) when it has a parseable last `\\boxed{}` AND the verifier judged it wrong (status
ok, score 0). Timed-out or crashed verifications are kept out and counted. Beside the pool, per
entry: `wrong_answer_finish_reason` (list<string>) and `wrong_answer_num_tokens` (list<int32>).
Options the reference lacks: `dedup` (drop exact-duplicate texts of a problem; on by default) and
`drop_truncated` (drop length-stopped samples); both report what they removed.

The weak model's verified CORRECT samples land in `correct_answer_with_boxed` (list<string>, sample
order, the same dedup / drop_truncated rules), for denoise.prefix_kind correct. That column is built
at assembly from the per-chunk rollout logs, so the parts and the wrong-pool columns are exactly
what they were before it existed, and a pool prepared earlier gains it on re-assembly.

Resumability: problems are processed in chunks; each finished chunk is committed by atomically
renaming its parquet part into <work>/parts/ (its log and stats are written before, so a part
that exists is complete). A re-run after a kill skips committed chunks and redoes only the one
that was in flight; the final files are assembled from the parts, so nothing is written twice.
A manifest pins the settings: resuming with different settings is refused.
Sampling seeds derive from (seed, row index, sample index), so results do not depend on the
chunking or on where a run was interrupted.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_denoise.core.seeding import derive_seed
from megatron_denoise.core.types import RolloutRequest, RowKind

from megatron_denoise.data.schema import POOL as POOL_COLUMN  # "wrong_answer_with_boxed", list<string>
FINISH_COLUMN = "wrong_answer_finish_reason"
LENGTH_COLUMN = "wrong_answer_num_tokens"
# verified correct samples (denoise.prefix_kind correct, denoise.correct_pool_column): list<string>,
# same rules as the wrong pool (parseable box, judged correct; dedup / drop_truncated alike)
CORRECT_COLUMN = "correct_answer_with_boxed"

__all__ = ["PrepareSettings", "prepare_pool", "output_paths", "resolve_input", "POOL_COLUMN", "CORRECT_COLUMN"]


@dataclass
class PrepareSettings:
    """Defaults follow METHOD.md section 1 (the paper's weak-model sampling)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    seed: int = 0
    dedup: bool = True
    drop_truncated: bool = False
    chunk_size: int = 64
    max_problems: Optional[int] = None
    engine: str = "vllm"  # vllm | hf
    dtype: Optional[str] = None
    verifier_workers: int = 2
    verifier_deadline_s: float = 5.0

    def fingerprint(self, model: str, input_path: Path, rows: list) -> dict:
        """What must not change between a run and its resumption: the settings, the model, and the
        problems themselves (prompt messages and ground truths: a changed prompt template must not
        resume onto samples drawn for the old one)."""
        import hashlib

        keep = {k: v for k, v in asdict(self).items() if k not in ("verifier_workers", "engine", "dtype")}
        digest = hashlib.sha1(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        return dict(keep, model=str(Path(model).resolve()), input=str(input_path.resolve()), num_rows=len(rows),
                    problems_sha1=digest)


def output_paths(input_path: Path, output_dir: Optional[Path] = None) -> tuple[Path, Path]:
    """(final parquet, work folder) for an input file."""
    out_dir = Path(output_dir) if output_dir is not None else input_path.parent
    stem = input_path.name[:-len(".parquet")] if input_path.name.endswith(".parquet") else input_path.stem
    return out_dir / f"{stem}.with_wrong_boxed.parquet", out_dir / f"{stem}.prepare"


# ---------------------------------------------------------------------------------------------
# Input

def _read_problems(path: Path, max_problems: Optional[int]):
    """The input table (data layer reader: parquet or JSONL) and, per row, (chat messages, ground
    truth). Every bad row is reported by index; preparation refuses to start with any."""
    from megatron_denoise.data.io import read_table
    from megatron_denoise.data.problems import table_to_problems

    table = read_table(path)
    if max_problems is not None:
        table = table.slice(0, max_problems)
    problems, report = table_to_problems(table, str(path))
    if report.bad_rows:
        listed = "; ".join(f"row {b.row}: {b.reason}" for b in report.bad_rows[:10])
        more = f" (and {len(report.bad_rows) - 10} more)" if len(report.bad_rows) > 10 else ""
        raise ValueError(f"prepare_data: {path}: {len(report.bad_rows)} bad row(s): {listed}{more}")
    return table, [([dict(m) for m in p.prompt], p.ground_truth) for p in problems]


def resolve_input(name_or_path: str | os.PathLike, output_dir: Optional[Path], prompt=None) -> Path:
    """A data file, or a named set of the data layer (gsm8k, math500, ...) materialised as
    <output_dir or .>/<name>.parquet in the reference schema."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".parquet", ".jsonl", ".json"):
        return path
    from megatron_denoise.data.sources import NAMED_SETS, load_named_set

    if str(name_or_path) not in NAMED_SETS:
        raise FileNotFoundError(f"prepare_data: {name_or_path} is neither a file nor a named set ({sorted(NAMED_SETS)})")
    out = (output_dir or Path(".")) / f"{name_or_path}.parquet"
    table, _ = load_named_set(str(name_or_path), prompt)
    if out.exists():
        from megatron_denoise.data.io import read_table

        if read_table(out).equals(table):
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_parquet_atomic(table, out)  # (re)written: e.g. another prompt template
    return out


# ---------------------------------------------------------------------------------------------
# Small atomic file helpers

def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_parquet_atomic(table, path: Path) -> None:
    from megatron_denoise.data.io import write_table  # temp file + rename

    write_table(table, path)


# ---------------------------------------------------------------------------------------------
# One chunk

@dataclass
class _ChunkResult:
    pools: list = field(default_factory=list)      # per problem: [text, ...]
    finishes: list = field(default_factory=list)   # per problem: [finish_reason, ...]
    lengths: list = field(default_factory=list)    # per problem: [num_tokens, ...]
    log: list = field(default_factory=list)        # per problem: dict
    stats: Counter = field(default_factory=Counter)


def _process_chunk(rows: Sequence[tuple[list, Any]], row0: int, prompt_ids: Sequence[tuple[int, ...]],
                   engine, tokenizer, scorer, s: PrepareSettings, max_model_len: int) -> _ChunkResult:
    from megatron_denoise.reward import VerifyStatus
    from megatron_denoise.rollout.engine import SamplingSpec

    reqs: list[RolloutRequest] = []
    for j, ids in enumerate(prompt_ids):
        budget = min(s.max_tokens, max_model_len - len(ids))
        for k in range(s.n):
            reqs.append(RolloutRequest(
                problem_uid=str(row0 + j), group_id=row0 + j, slot=k, kind=RowKind.MAIN, prompt_ids=ids,
                prefix=None, max_tokens=budget, seed=derive_seed("prepare_data", s.seed, row0 + j, k, bits=31)))
    comps = engine.generate(reqs, SamplingSpec(temperature=s.temperature, top_p=s.top_p))
    texts = tokenizer.batch_decode([list(c.token_ids) for c in comps], skip_special_tokens=True)
    gts = [rows[j][1] for j in range(len(rows)) for _ in range(s.n)]
    verdicts = scorer.score_batch(texts, gts)

    res = _ChunkResult()
    st = res.stats
    for j in range(len(rows)):
        pool, fin, lens, samples, seen = [], [], [], [], set()
        for k in range(s.n):
            i = j * s.n + k
            c, v, text = comps[i], verdicts[i], texts[i]
            boxed = v.status is not VerifyStatus.NO_BOX
            wrong = v.status is VerifyStatus.OK and not v.correct
            st["samples"] += 1
            st["tokens"] += len(c.token_ids)
            st["boxed"] += int(boxed)
            st["correct"] += int(v.correct)
            st["truncated"] += int(c.finish_reason == "length")
            st[f"status_{v.status.value}"] += 1
            removed = None
            if wrong:
                st["wrong_with_box"] += 1
                if s.drop_truncated and c.finish_reason == "length":
                    removed = "truncated"
                elif s.dedup and text.strip() in seen:
                    removed = "duplicate"
                else:
                    seen.add(text.strip())
                    pool.append(text)
                    fin.append(c.finish_reason)
                    lens.append(len(c.token_ids))
                if removed:
                    st[f"removed_{removed}"] += 1
            samples.append(dict(text=text, finish_reason=c.finish_reason, num_tokens=len(c.token_ids),
                                status=v.status.value, answer=v.answer, correct=bool(v.correct),
                                in_pool=wrong and removed is None, removed=removed))
        st["problems"] += 1
        st["problems_with_pool"] += int(bool(pool))
        res.pools.append(pool)
        res.finishes.append(fin)
        res.lengths.append(lens)
        res.log.append(dict(row=row0 + j, ground_truth=rows[j][1], pool_size=len(pool), samples=samples))
    return res


# ---------------------------------------------------------------------------------------------
# The whole run

def prepare_pool(input_path: str | os.PathLike, model: str, settings: PrepareSettings, *,
                 output_dir: str | os.PathLike | None = None, overwrite: bool = False,
                 progress: bool = True, fail_after_chunks: Optional[int] = None,
                 log: Callable[[str], None] = print, engine_factory: Optional[Callable[..., Any]] = None) -> dict:
    """Run (or resume) preparation; returns the summary dict (also written to summary.json).

    engine_factory(model, settings, max_model_len, work_dir) -> RolloutEngine replaces the engine
    named by settings.engine (for other engines, e.g. a remote one, and tests).
    """
    import pyarrow as pa

    os.environ["HF_HUB_OFFLINE"] = "1"
    input_path = Path(input_path)
    final_path, work = output_paths(input_path, Path(output_dir) if output_dir else None)
    parts = work / "parts"
    if settings.n < 1 or settings.chunk_size < 1 or settings.max_tokens < 1:
        raise ValueError(f"prepare_data: n ({settings.n}), chunk_size ({settings.chunk_size}) and "
                         f"max_tokens ({settings.max_tokens}) must be >= 1")

    table, rows = _read_problems(input_path, settings.max_problems)
    if POOL_COLUMN in table.column_names:
        log(f"note: {input_path} already has a {POOL_COLUMN!r} column; it is replaced")
        table = table.drop_columns([c for c in (POOL_COLUMN, FINISH_COLUMN, LENGTH_COLUMN, CORRECT_COLUMN)
                                    if c in table.column_names])

    manifest = settings.fingerprint(model, input_path, rows)
    manifest_path = work / "manifest.json"
    if overwrite and work.exists():
        import shutil
        shutil.rmtree(work)
    parts.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"prepare_data: {work} holds a run with other settings {diff} "
                             f"(old, new); pass --overwrite to start again")
    else:
        _write_atomic(manifest_path, json.dumps(manifest, indent=2).encode())

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    from megatron_denoise.core.prefix import render_prompt_ids
    prompt_ids = [render_prompt_ids(tokenizer, msgs) for msgs, _ in rows]
    max_prompt = max((len(p) for p in prompt_ids), default=1)
    max_model_len = max_prompt + settings.max_tokens

    chunks = [(a, min(a + settings.chunk_size, len(rows))) for a in range(0, len(rows), settings.chunk_size)]
    part_path = lambda c: parts / f"part-{c:05d}.parquet"  # noqa: E731
    todo = [c for c in range(len(chunks)) if not part_path(c).exists()]
    if len(todo) < len(chunks):
        log(f"resuming: {len(chunks) - len(todo)}/{len(chunks)} chunks already done in {parts}")

    t_start = time.perf_counter()
    if todo:
        engine = (engine_factory or _make_engine)(model, settings, max_model_len, work)
        from megatron_denoise.reward import VerifierPool
        scorer = VerifierPool(num_workers=settings.verifier_workers, deadline_s=settings.verifier_deadline_s)
        try:
            _run_chunks(todo, chunks, rows, prompt_ids, table, engine, tokenizer, scorer, settings,
                        max_model_len, parts, part_path, progress, fail_after_chunks)
        finally:
            engine.close()
            scorer.close()

    # Assemble the final files from the committed parts (in chunk order).
    from megatron_denoise.data.io import read_table
    tables = [read_table(part_path(c)) for c in range(len(chunks))]
    out = pa.concat_tables(tables) if tables else table
    if out.num_rows != len(rows):
        raise RuntimeError(f"prepare_data: assembled {out.num_rows} rows from {len(tables)} parts, expected {len(rows)}")
    if CORRECT_COLUMN in out.column_names:  # an input that carried one: rebuilt from this run's samples
        out = out.drop_columns([CORRECT_COLUMN])
    correct = _correct_pools([parts / f"log-{c:05d}.jsonl" for c in range(len(chunks))], settings)
    out = out.append_column(CORRECT_COLUMN, pa.array(correct, type=pa.list_(pa.string())))
    final_path.parent.mkdir(parents=True, exist_ok=True)
    _write_parquet_atomic(out, final_path)
    logs = b"".join((parts / f"log-{c:05d}.jsonl").read_bytes() for c in range(len(chunks)))
    _write_atomic(work / "rollouts.jsonl", logs)
    stats: Counter = Counter()
    for c in range(len(chunks)):
        stats.update(json.loads((parts / f"stats-{c:05d}.json").read_text()))
    summary = _summary(stats, out.column(POOL_COLUMN).to_pylist(), settings, model, input_path, final_path,
                       time.perf_counter() - t_start)
    summary["correct_entries"] = sum(len(c) for c in correct)
    summary["share_with_correct"] = sum(1 for c in correct if c) / max(len(correct), 1)
    _write_atomic(work / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    log(f"wrote {final_path} ({out.num_rows} problems), {work / 'rollouts.jsonl'}, {work / 'summary.json'}")
    log(f"accuracy {summary['accuracy']:.3f}, problems with >=1 wrong-with-box "
        f"{summary['share_with_wrong_boxed']:.3f}, extraction rate {summary['extraction_rate']:.3f}; "
        f"removed {summary['removed_duplicates']} duplicates, {summary['removed_truncated']} truncated")
    return summary


def _correct_pools(log_paths: Sequence[Path], s: PrepareSettings) -> list[list[str]]:
    """Per problem, in row order: the texts of its samples judged correct (from the rollout logs),
    with the wrong pool's rules: truncated ones dropped with drop_truncated, duplicates with dedup."""
    pools: list[list[str]] = []
    for path in log_paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            pool, seen = [], set()
            for smp in json.loads(line)["samples"]:
                if not smp["correct"] or (s.drop_truncated and smp["finish_reason"] == "length"):
                    continue
                if s.dedup and smp["text"].strip() in seen:
                    continue
                seen.add(smp["text"].strip())
                pool.append(smp["text"])
            pools.append(pool)
    return pools


def _make_engine(model: str, s: PrepareSettings, max_model_len: int, work: Path):
    from megatron_denoise.config.schema import RolloutConfig
    from megatron_denoise.rollout.engine import make_engine

    cfg = RolloutConfig(engine=s.engine, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    return make_engine(model, cfg, max_model_len=max_model_len, run_dir=str(work), dtype=s.dtype)


def _run_chunks(todo, chunks, rows, prompt_ids, table, engine, tokenizer, scorer, s, max_model_len, parts,
                part_path, progress, fail_after_chunks) -> None:
    import pyarrow as pa
    from tqdm import tqdm

    from megatron_denoise.data.schema import with_pool_column

    total = sum(chunks[c][1] - chunks[c][0] for c in todo)
    from megatron_denoise.console import bar_stream

    bar = tqdm(total=total, unit="problem", desc="wrong-solution pool", disable=not progress, file=bar_stream(),
               dynamic_ncols=True)
    t0, tokens, done = time.perf_counter(), 0, 0
    for written, c in enumerate(todo, start=1):
        a, b = chunks[c]
        res = _process_chunk(rows[a:b], a, prompt_ids[a:b], engine, tokenizer, scorer, s, max_model_len)
        part = with_pool_column(table.slice(a, b - a), res.pools, POOL_COLUMN)
        part = part.append_column(FINISH_COLUMN, pa.array(res.finishes, type=pa.list_(pa.string())))
        part = part.append_column(LENGTH_COLUMN, pa.array(res.lengths, type=pa.list_(pa.int32())))
        # Log and stats first, the part last: an existing part means a complete chunk.
        _write_atomic(parts / f"log-{c:05d}.jsonl",
                      "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in res.log).encode())
        _write_atomic(parts / f"stats-{c:05d}.json", json.dumps(dict(res.stats)).encode())
        _write_parquet_atomic(part, part_path(c))
        tokens += res.stats["tokens"]
        done += b - a
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.update(b - a)
        bar.set_postfix_str(f"{done / dt:.2f} problems/s, {tokens / dt:.0f} tokens/s")
        if fail_after_chunks is not None and written >= fail_after_chunks:
            bar.close()
            sys.stderr.write(f"prepare_data: fault injection: exiting hard after {written} chunk(s)\n")
            sys.stderr.flush()
            os._exit(17)  # like a kill: no cleanup, no final assembly
    bar.close()


def _summary(stats: Counter, pools: list, s: PrepareSettings, model: str, input_path: Path, final_path: Path,
             seconds: float) -> dict:
    n = max(stats["samples"], 1)
    problems = max(stats["problems"], 1)
    hist = Counter(len(p) for p in pools)
    return dict(
        input=str(input_path), output=str(final_path), model=str(model), settings=asdict(s),
        problems=stats["problems"], samples=stats["samples"],
        accuracy=stats["correct"] / n,
        share_with_wrong_boxed=stats["problems_with_pool"] / problems,
        extraction_rate=stats["boxed"] / n,
        wrong_with_box=stats["wrong_with_box"],
        pool_entries=sum(len(p) for p in pools),
        pool_size_histogram={str(k): hist[k] for k in sorted(hist)},
        removed_duplicates=stats["removed_duplicate"], removed_truncated=stats["removed_truncated"],
        truncated_samples=stats["truncated"],
        verifier_status={k[len("status_"):]: v for k, v in stats.items() if k.startswith("status_")},
        generated_tokens=stats["tokens"], seconds_this_invocation=round(seconds, 2),
    )
