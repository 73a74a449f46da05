"""The readable console (issue 17): third-party output goes to <run>/logs/, the run's own lines and
progress bars reach the person, --verbose shows everything. Each case runs a small script in a
fresh interpreter (the filter moves file descriptors 1 and 2) and reads what it printed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(r"""
    import logging, os, subprocess, sys, warnings
    from megatron_denoise.console import bar_stream, quiet_console
    run_dir, verbose = sys.argv[1], sys.argv[2] == "1"
    with quiet_console(run_dir, verbose=verbose):
        print("OURS: step 1/1")
        warnings.warn("THIRD-PARTY FutureWarning", FutureWarning)
        logging.getLogger("vllm.platforms").warning("THIRD-PARTY vllm logger")
        logging.getLogger("ray").info("THIRD-PARTY ray info")
        os.write(1, b"THIRD-PARTY C-level stdout\n")
        os.write(2, b"THIRD-PARTY C-level stderr\n")
        # a process started by the driver (a verifier worker, a worker of the engine)
        subprocess.run([sys.executable, "-c", "import sys; print('THIRD-PARTY child stdout'); "
                        "sys.stderr.write('THIRD-PARTY child stderr\\n')"], check=True)
        # a worker: what Ray's actors call first (MDN_LOG_DIR is exported to them)
        subprocess.run([sys.executable, "-c", "import warnings\n"
                        "from megatron_denoise.console import redirect_worker_output\n"
                        "redirect_worker_output('policy_rank0')\n"
                        "warnings.warn('THIRD-PARTY worker UserWarning')\nprint('THIRD-PARTY worker print')"],
                       check=True)
        bar_stream().write("BAR 50%\r")
        bar_stream().flush()
    print("OURS: after the filter")
    raise SystemExit("OURS: a fatal error is seen")
""")


def run_driver(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / ("v" if verbose else "q")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("MDN_LOG_DIR", "MDN_VERBOSE", "VLLM_CONFIGURE_LOGGING"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(run_dir), "1" if verbose else "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, run_dir


def test_third_party_output_goes_to_the_run_logs_and_ours_to_the_console(tmp_path):
    proc, run_dir = run_driver(tmp_path, verbose=False)
    assert proc.returncode == 1
    console = proc.stdout + proc.stderr
    assert "THIRD-PARTY" not in console, console
    assert proc.stdout.splitlines() == ["OURS: step 1/1", "OURS: after the filter"]
    assert "BAR 50%" in proc.stderr and "OURS: a fatal error is seen" in proc.stderr
    driver = (run_dir / "logs" / "driver.log").read_text()
    for needle in ("THIRD-PARTY FutureWarning", "THIRD-PARTY vllm logger", "THIRD-PARTY ray info",
                   "THIRD-PARTY C-level stdout", "THIRD-PARTY C-level stderr", "THIRD-PARTY child stdout",
                   "THIRD-PARTY child stderr"):
        assert needle in driver, needle
    worker = (run_dir / "logs" / "policy_rank0.log").read_text()
    assert "THIRD-PARTY worker UserWarning" in worker and "THIRD-PARTY worker print" in worker
    assert "worker" not in driver


def test_verbose_shows_everything_and_writes_no_logs(tmp_path):
    proc, run_dir = run_driver(tmp_path, verbose=True)
    console = proc.stdout + proc.stderr
    for needle in ("OURS: step 1/1", "THIRD-PARTY FutureWarning", "THIRD-PARTY vllm logger",
                   "THIRD-PARTY C-level stdout", "THIRD-PARTY child stderr", "THIRD-PARTY worker UserWarning",
                   "OURS: a fatal error is seen"):
        assert needle in console, needle
    assert not (run_dir / "logs").exists()


def test_a_ray_workers_warning_lands_in_its_log_file_not_on_the_console(tmp_path):
    """The real path of a run's workers: init_ray (log_to_driver off under the filter) and an actor
    that redirects its output first thing, as PolicyWorkerImpl and EngineReplicaImpl do. The same
    worker shows trainer.malloc_arena_max at work: threads it starts share glibc's one arena."""
    script = textwrap.dedent(r"""
        import sys, warnings
        import ray
        from megatron_denoise.config.schema import Config
        from megatron_denoise.console import quiet_console
        from megatron_denoise.trainer.workers import init_ray

        class Impl:
            def __init__(self):
                from megatron_denoise.console import redirect_worker_output
                redirect_worker_output("policy_rank0")
            def work(self):
                warnings.warn("THIRD-PARTY deprecated in the worker", DeprecationWarning)
                print("THIRD-PARTY worker stdout", flush=True)
                import os
                os.write(2, b"THIRD-PARTY worker fd2\n")
                return 7
            def arenas(self):
                import ctypes, os, tempfile, threading
                libc = ctypes.CDLL(None)
                libc.malloc.restype = libc.fopen.restype = ctypes.c_void_p
                def work():  # threads that allocate, as the refit's loader thread does
                    for _ in range(50):
                        libc.free(ctypes.c_void_p(libc.malloc(100000)))
                ts = [threading.Thread(target=work) for _ in range(4)]
                [t.start() for t in ts]; [t.join() for t in ts]
                path = tempfile.mktemp()
                f = libc.fopen(path.encode(), b"w"); libc.malloc_info(0, ctypes.c_void_p(f)); libc.fclose(ctypes.c_void_p(f))
                return os.environ.get("MALLOC_ARENA_MAX"), open(path).read().count("<heap nr=")

        with quiet_console(sys.argv[1]):
            cfg = Config()
            cfg.trainer.malloc_arena_max = 1
            init_ray(cfg, sys.argv[1])
            a = ray.remote(num_cpus=0)(Impl).remote()
            assert ray.get(a.work.remote(), timeout=120) == 7
            assert ray.get(a.arenas.remote(), timeout=120) == ("1", 1)
            import time; time.sleep(2)  # what Ray would forward arrives within its log-monitor period
            ray.shutdown()
            print("OURS: done")
    """)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="always")
    for k in ("MDN_LOG_DIR", "MDN_VERBOSE", "RAY_ADDRESS"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "THIRD-PARTY" not in console, console
    assert proc.stdout.strip().splitlines() == ["OURS: done"], console
    log = (run_dir / "logs" / "policy_rank0.log").read_text()
    for needle in ("THIRD-PARTY deprecated in the worker", "THIRD-PARTY worker stdout", "THIRD-PARTY worker fd2"):
        assert needle in log, (needle, log[-2000:])


def test_the_warm_start_child_gets_a_log_file_and_the_console_a_bar(tmp_path):
    """prepare.stage runs the warm-start with its output in <run>/logs/warm_start.log and shows a bar
    over its `[sft] step n/N` lines; a failing child's last lines reach the console."""
    child = ("import sys, warnings\n"
             "for i in range(1, 6): print(f'[sft] step {i}/5 | loss 1.0', flush=True)\n"
             "warnings.warn('THIRD-PARTY in the warm-start')\n"
             "assert sys.argv[-1] == '--verbose'\n"
             "sys.exit(int(sys.argv[1]))\n")
    script = textwrap.dedent(r"""
        import sys
        from megatron_denoise.console import quiet_console
        from megatron_denoise.prepare.stage import _run_child
        with quiet_console(sys.argv[1]):
            rc = _run_child([sys.executable, "-c", sys.argv[2], sys.argv[3]], "warm_start", print)
        print("rc", rc)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("MDN_LOG_DIR", "MDN_VERBOSE"):
        env.pop(k, None)
    for code in (0, 3):
        run_dir = tmp_path / f"run{code}"
        proc = subprocess.run([sys.executable, "-c", script, str(run_dir), child, str(code)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        log = (run_dir / "logs" / "warm_start.log").read_text()
        assert "[sft] step 5/5" in log and "THIRD-PARTY in the warm-start" in log
        assert "5/5" in proc.stderr  # the bar reached its total
        assert proc.stdout.strip().endswith(f"rc {code}")
        if code:  # the failure is shown with the log's name and its last lines
            assert "exited with code 3" in proc.stdout and "THIRD-PARTY in the warm-start" in proc.stdout
        else:
            assert "[sft] step" not in proc.stdout and "THIRD-PARTY" not in proc.stdout


def test_a_validation_is_one_console_line_and_its_table_goes_to_the_log(tmp_path, monkeypatch, capsys):
    """Under the filtered console the trainer's validation prints one line (every set's AVG@k and
    pass@k, the overall figure); the markdown table goes to stderr, which is logs/driver.log there."""
    import re

    from megatron_denoise import console
    from megatron_denoise.config.schema import Config, DataConfig, TaskConfig
    from megatron_denoise.core.types import Completion
    from megatron_denoise.data import load_eval_set
    from megatron_denoise.prepare.models import byte_tokenizer
    from megatron_denoise.prepare.tasks import TESTBED_PROMPT, write_task_file
    from megatron_denoise.reward.boxed import last_boxed
    from megatron_denoise.reward.result import VerifyResult, VerifyStatus
    from megatron_denoise.trainer.problems import PromptCache
    from megatron_denoise.trainer.run import _validate

    tok = byte_tokenizer()

    class Engine:  # answers 2 of every 4 samples right: AVG@4 50%, pass@4 100%
        def generate(self, requests, sampling):
            out = []
            for r in requests:
                expr = re.search(r"Compute ([0-9+\-]+)\.", tok.decode(r.engine_input_ids)).group(1)
                val = eval(expr) + (r.slot % 2)  # noqa: S307 - digits and +/- only
                ids = tok("\\boxed{%d}" % val, add_special_tokens=False)["input_ids"]
                out.append(Completion(token_ids=tuple(ids) + (tok.eos_token_id,), finish_reason="stop"))
            return out

    class Scorer:
        def score_batch(self, texts, truths):
            return [VerifyResult(score=float(last_boxed(t) == g), status=VerifyStatus.OK, answer=last_boxed(t))
                    for t, g in zip(texts, truths)]

    held = tmp_path / "heldout.parquet"
    write_task_file(held, TaskConfig(seed=2, count=10, max_operand=9), TESTBED_PROMPT, "heldout")
    data = DataConfig(prompt=TESTBED_PROMPT)
    cfg = Config()
    cfg.data = data
    cfg.logging.output_dir = str(tmp_path / "run")
    cfg.eval.k = {"heldout": 4}
    sets = {"heldout": load_eval_set(str(held), data, tok)}
    monkeypatch.setattr(console, "log_dir", lambda: tmp_path / "logs")
    metrics = _validate(cfg, Engine(), tok, sets, Scorer(), PromptCache(tok), step=20)
    out, err = capsys.readouterr()
    assert metrics["val/heldout/avg@4"] == 0.5
    assert out.splitlines() == ["[megatron-denoise] validation after step 20: heldout AVG@4 50.0% (pass@4 100.0%); "
                                "overall 50.0%"]
    assert "| heldout | 10 | 4 | 50.0 | 100.0 |" in err
    monkeypatch.setattr(console, "log_dir", lambda: None)  # --verbose: the table on the console
    _validate(cfg, Engine(), tok, sets, Scorer(), PromptCache(tok), step=40)
    assert "| heldout | 10 | 4 | 50.0 | 100.0 |" in capsys.readouterr().out
