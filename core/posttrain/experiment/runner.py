"""``posttrain experiment``: running the jobs (skipping finished ones), in this process or in a
pool of spawned workers, and the final pass@k evaluation of each run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from .. import run as run_lib
from ..config import ConfigError
from .spec import BASE_PLACEHOLDER, Job, Spec

DONE_FILE = "done.json"


# --- running -----------------------------------------------------------------------------------


def read_done(run_dir: Path) -> Optional[dict]:
    f = Path(run_dir) / DONE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def _normalized(cfg: dict) -> Any:
    return json.loads(json.dumps(cfg, sort_keys=True, default=str))


def check_finished_configs(jobs: list[Job]) -> None:
    """A finished run whose config the spec has since changed must not be silently reused."""
    problems = []
    for job in jobs:
        done = read_done(job.run_dir)
        if done is not None and _normalized(done.get("config")) != _normalized(job.config):
            old, new = _flatten(done.get("config") or {}), _flatten(job.config)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            problems.append(f"{job.name}: finished in {job.run_dir} with a different config (changed: {', '.join(changed[:6])}); "
                            "delete that directory to run it again, or use another --out")
    if problems:
        raise ConfigError(problems, "experiment")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(d, list) and any(isinstance(x, dict) for x in d):
        return {k2: v2 for i, v in enumerate(d) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): d}


@dataclass
class HeldOut:
    """The benchmark YAML of ``posttrain eval`` for one ``data.eval`` source."""

    yaml: Path
    overrides: list[str]


def prepare_final_eval(spec: Spec, jobs: list[Job]) -> dict[str, HeldOut]:
    """Write each distinct held-out split as a JSONL benchmark (once, before any worker starts)."""
    if not spec.final_eval:
        return {}
    from ..data import load_examples

    out: dict[str, HeldOut] = {}
    for job in jobs:
        cfg = run_lib.load_config(job.config)
        last = run_lib.stage_configs(cfg)[-1]  # the final weights are evaluated on the last stage's split
        source = last.data.eval
        if not source:
            raise ConfigError([f"final_eval: {job.name} has no data.eval to evaluate on"], str(spec.path))
        key = hashlib.sha1(json.dumps([source, last.data.prompt_key, last.data.answer_key, last.verifier.name]).encode()).hexdigest()[:10]
        d = spec.out / "heldout"
        bench = d / f"heldout-{key}.yaml"
        if not bench.exists():
            d.mkdir(parents=True, exist_ok=True)
            rows = load_examples(source, prompt_key=last.data.prompt_key, answer_key=last.data.answer_key)
            jsonl = d / f"heldout-{key}.jsonl"
            jsonl.write_text("".join(json.dumps({"problem": ex.prompt, "answer": ex.answer}) + "\n" for ex in rows))
            OmegaConf.save(OmegaConf.create({"name": "heldout", "file": str(jsonl.resolve()), "kind": "math",
                                             "problem_key": "problem", "answer_key": "answer",
                                             "verifier": last.verifier.name}), bench)
        fe = spec.final_eval
        sampling = {"n": fe.get("n", 1), "k": list(fe.get("k", [1])), "temperature": fe.get("temperature", 1.0),
                    "top_p": fe.get("top_p", 1.0), "max_new_tokens": fe.get("max_new_tokens") or last.rollout.max_new_tokens,
                    "max_problems": fe.get("max_problems"), "seed": job.seed, "progress": False,
                    "rollout.batch_size": last.rollout.batch_size, "verifier.workers": last.verifier.workers,
                    "verifier.timeout_s": last.verifier.timeout_s, "template": last.data.template,
                    "system_prompt": last.data.system_prompt}
        overrides = [f"{k}={json.dumps(v)}" for k, v in sampling.items()]  # JSON values are YAML values
        out[job.name] = HeldOut(bench, overrides)
    return out


def run_job(job: Job, base_path: Optional[str], held_out: Optional[HeldOut]) -> dict:
    """Train one run (and its final pass@k evaluation), output to ``run_dir/log.txt``; write
    ``done.json`` last. Returns {"name", "ok", "seconds", "error"?}."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(job.config).replace(json.dumps(BASE_PLACEHOLDER), json.dumps(base_path or BASE_PLACEHOLDER)))
    t0 = time.perf_counter()
    with open(job.run_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            finals = [str(p) for p in run_lib.train(cfg)]
            if held_out is not None:
                from ..eval import run_eval

                run_eval([finals[-1]], [str(held_out.yaml)], job.run_dir / "final_eval", held_out.overrides)
        except Exception as e:  # one failed run must not stop the grid: reported at the end
            traceback.print_exc()
            return {"name": job.name, "ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - t0
    done = {"config": job.config, "finals": finals, "seconds": seconds}
    tmp = job.run_dir / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(done, indent=2, default=str) + "\n")
    tmp.replace(job.run_dir / DONE_FILE)
    return {"name": job.name, "ok": True, "seconds": seconds}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # workers share the cores instead of oversubscribing them


def run_jobs(jobs: list[Job], base_path: Optional[str], held_out: dict[str, HeldOut], *, workers: int = 1) -> list[dict]:
    """Run the unfinished jobs, in this process (workers=1) or in ``workers`` spawned processes."""
    todo = [j for j in jobs if read_done(j.run_dir) is None]
    for j in jobs:
        if j not in todo:
            print(f"[skip] {j.name}: finished ({j.run_dir / DONE_FILE})")
    results = []
    if workers <= 1 or len(todo) <= 1:
        for i, job in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {job.name} → {job.run_dir}", flush=True)
            results.append(_report(run_job(job, base_path, held_out.get(job.name))))
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(run_job, job, base_path, held_out.get(job.name)): job for job in todo}
        print(f"{len(todo)} run(s) on {workers} workers × {threads} thread(s)", flush=True)
        for fut in as_completed(futures):
            try:
                results.append(_report(fut.result()))
            except Exception as e:  # the worker process itself died
                results.append(_report({"name": futures[fut].name, "ok": False, "seconds": 0.0, "error": f"{type(e).__name__}: {e}"}))
    return results


def _report(r: dict) -> dict:
    status = f"done in {r['seconds']:.0f} s" if r["ok"] else f"FAILED: {r['error']}"
    print(f"  {r['name']}: {status}", flush=True)
    return r
