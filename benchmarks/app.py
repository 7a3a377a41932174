"""Does the workbench answer the keyboard while a job trains on the same cores?

    python benchmarks/app.py [--rounds 6] [--settle 0.5] [--job reward|none] [--model embedded]

Drives the labeling screen with Textual's pilot (headless, the screen still laid
out and rendered) on the embedded model, as a researcher uses it: the model
loaded in 4-bit, completions sampled ahead in the app's worker thread, and (with
``--job reward``, the default) a reward model fine-tuning in its own process on
imported HH pairs, started with ``rlhf train-reward`` as the Train screen starts it.

Two figures:

- key press to screen update: the time from a key reaching the app to the first
  screen update painted after its action ran (``App._display``, which the
  compositor calls with each update). Keys that change only what is shown: the
  prompt list on and off (``l``), ranking mode on and off (``m``), the next and
  previous prompt (``n``, ``p``). Textual's ``pilot.press`` is not the clock: it
  waits for the whole process to go idle, and the sampling thread never is.
- pick to ready: from a pick (``1``) until the next prompt's completions are on
  screen; zero when the look-ahead had sampled them, a sample's time when not.

Prints each key press, a table, and as its last line
``app p95_ms=<key press to update, 95th percentile> pick_ready_s=<median>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-harmless-sample.jsonl"
KEYS = ("l", "l", "m", "m", "n", "p")  # one round of look-and-move keys, then a pick
SIZE = (150, 45)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds of l l m m n p then a pick")
    p.add_argument("--job", choices=("reward", "none"), default="reward", help="what trains beside the app")
    p.add_argument("--model", default="embedded")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds between key presses (0.5: a fast labeler, 4 s a prompt; 1.5: about 10 s)")
    return p.parse_args(argv)


def rlhf(db: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from rlhf.cli import main; sys.exit(main())", "--db", str(db),
                    *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def start_job(db: Path) -> None:
    """A reward model fine-tuning on the HH pairs: long enough to outlast the run."""
    rlhf(db, "import", str(HH))
    rlhf(db, "train-reward", "--sources", "import", "--finetune", "--max-epochs", "50", "--patience", "50",
         "--no-wait")


def stop_jobs(db: Path) -> None:
    """Cancel the job, and kill it if it has not stopped within a minute (it acts between steps)."""
    import psutil

    from rlhf.jobs import request, wait
    from rlhf.store import Store

    with Store(db) as store:
        for job in store.jobs(active=True):
            request(store, job.id, "cancel")
            try:
                wait(store, job.id, timeout_s=60)
            except TimeoutError:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(job.pid).kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def drive(db: Path, args: argparse.Namespace) -> tuple[dict[str, list[float]], list[float], float]:
    from textual import events

    from rlhf.model_options import ModelOptions
    from rlhf.store import Store
    from workbench.app import WorkbenchApp
    from workbench.model_host import quiet_libraries

    class TimedApp(WorkbenchApp):
        """The workbench, noting when each action finished and each update was painted."""

        CSS_PATH = str(ROOT / "workbench" / "app.tcss")  # a relative CSS_PATH is read beside the subclass

        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            self.painted: list[float] = []
            self.acted: list[float] = []

        def _display(self, screen, renderable) -> None:  # type: ignore[no-untyped-def]
            if renderable is not None:
                self.painted.append(time.perf_counter())
            super()._display(screen, renderable)

        async def _dispatch_action(self, namespace, action_name, params) -> bool:  # type: ignore[no-untyped-def]
            try:
                return await super()._dispatch_action(namespace, action_name, params)
            finally:
                self.acted.append(time.perf_counter())

    async def until(condition, timeout: float) -> None:  # type: ignore[no-untyped-def]
        end = time.perf_counter() + timeout
        while not condition():
            if time.perf_counter() > end:
                raise SystemExit(f"gave up after {timeout:.0f} s waiting for the workbench")
            await asyncio.sleep(0.002)

    async def press(app: TimedApp, key: str) -> float:
        """Seconds from the key reaching the app to the first update painted after its action."""
        acted = len(app.acted)
        event = events.Key(key, key if len(key) == 1 else None)
        event.set_sender(app)
        start = time.perf_counter()
        app._driver.send_message(event)
        await until(lambda: len(app.acted) > acted, 30)
        done = app.acted[acted]
        await until(lambda: app.painted and app.painted[-1] >= done, 30)
        return next(t for t in app.painted if t >= done) - start

    quiet_libraries()
    latencies: dict[str, list[float]] = {}
    ready: list[float] = []
    with Store(db) as store:
        app = TimedApp(store, model=ModelOptions(source=args.model), labeler="bench", idle_gc=True)
        async with app.run_test(size=SIZE) as pilot:
            started = time.perf_counter()
            screen = app.screen
            await until(lambda: app.model_state == "ready" and bool(screen.shown), 600)
            loaded = time.perf_counter() - started
            print(f"model loaded and first completions shown after {loaded:.0f} s", flush=True)
            for r in range(args.rounds):
                for key in KEYS:
                    await asyncio.sleep(args.settle)
                    latency = await press(app, key)
                    latencies.setdefault(key, []).append(latency)
                    print(f"round {r + 1} {key}: {latency * 1000:.0f} ms", flush=True)
                await asyncio.sleep(args.settle)
                labeled = screen.shown_prompt_id
                start = time.perf_counter()
                latencies.setdefault("1", []).append(await press(app, "1"))
                await until(lambda: bool(screen.shown) and screen.shown_prompt_id != labeled, 600)
                ready.append(time.perf_counter() - start)
                print(f"round {r + 1} pick: {latencies['1'][-1] * 1000:.0f} ms to the update, "
                      f"{ready[-1]:.1f} s to the next completions", flush=True)
            await pilot.exit(None)
    return latencies, ready, loaded


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # As `workbench` sets it before torch loads (workbench/__main__.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(ROOT))
    from rlhf.models import resolve_model_dir

    resolve_model_dir(args.model, progress=lambda m: print(m, file=sys.stderr))  # convert once, untimed
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        rlhf(db, "init")
        if args.job == "reward":
            start_job(db)
        try:
            latencies, ready, loaded = asyncio.run(drive(db, args))
        finally:
            stop_jobs(db)
    every = [v for values in latencies.values() for v in values]
    print(f"\nworkbench on {args.model}, {os.cpu_count()} cores, beside: "
          f"{'a reward job fine-tuning' if args.job == 'reward' else 'nothing'}")
    print(f"{'key':<6} {'presses':>7} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for key, values in [*latencies.items(), ("all", every)]:
        print(f"{key:<6} {len(values):>7} {statistics.median(values) * 1000:>10.0f} "
              f"{percentile(values, 0.95) * 1000:>8.0f} {max(values) * 1000:>8.0f}")
    print(f"pick to the next completions: median {statistics.median(ready):.1f} s, max {max(ready):.1f} s "
          f"({sum(r < 0.5 for r in ready)} of {len(ready)} ready within 0.5 s)")
    print(f"app p95_ms={percentile(every, 0.95) * 1000:.0f} pick_ready_s={statistics.median(ready):.1f}")


if __name__ == "__main__":
    main()
