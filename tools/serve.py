"""Serve every budget of one checkpoint behind an OpenAI-compatible API (continuous batching,
elastic budget control).

    python tools/serve.py --checkpoint runs/demo-stage2                      # http://127.0.0.1:8000/v1
    python tools/serve.py --checkpoint runs/demo-stage2 --host 0.0.0.0 --port 8000 --api-key "$KEY" \
        --max-batch 16 --max-queue 128 --max-model-len 4096

Model ids: `<name>` (the largest budget) and `<name>:<budget>` for each budget (GET /v1/models);
`--model-name` sets <name> (default: the checkpoint directory's name). Loads whatever
tools/generate.py loads (a parent, an elastic checkpoint, a slice, an HF directory in BF16,
FP8 or NVFP4). Prints `serving <name> on http://HOST:PORT/v1` when it accepts requests;
SIGTERM stops accepting, lets the requests in flight finish (--grace-period), exits 0.

Budgets may also be served by upstream OpenAI-compatible servers (an engine per budget slice:
vLLM, SGLang, llama.cpp's llama-server, or this tool), alone or next to the checkpoint's:

    python tools/serve.py --model-name nemotron --tokenizer slices/small \
        --upstream small=http://node1:8000/v1 --upstream full=http://node2:8000/v1
    python tools/serve.py --upstreams fleet.yaml       # model ids, API keys, timeouts (docs/serving.md)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--checkpoint", default=None, help="run dir, iter_* checkpoint dir or HF directory (its budgets run "
                        "here; optional with upstreams)")
    parser.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                        help="budget NAME served by the OpenAI-compatible server at URL (vLLM, SGLang, llama-server, "
                             "tools/serve.py), e.g. small=http://node1:8000/v1; repeat per budget")
    parser.add_argument("--upstreams", default=None, metavar="FILE",
                        help="a YAML file of upstream budgets: url, model id, API key, timeouts (docs/serving.md)")
    parser.add_argument("--upstream-timeout", type=float, default=60.0,
                        help="--upstream: seconds without a byte from an upstream before its request gets 504")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port; the one taken is printed)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on every route but /health")
    parser.add_argument("--model-name", default=None, help="the model id (default: the checkpoint directory's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="decode slots per budget (sequences decoded together)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="sequences that may wait for a slot; beyond it a request gets 429 with Retry-After")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + new tokens per sequence (default: the model's max_sequence_length); sets the "
                             "cache memory, printed at start")
    parser.add_argument("--grace-period", type=float, default=30.0, help="SIGTERM: seconds requests in flight get to finish")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of the checkpoint's; without "
                        "--checkpoint, the budgets' tokenizer (a slice's directory or a tokenizer.json)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations (default fp32, "
                        "as tools/generate.py; bf16 on GPUs)")
    parser.add_argument("--precision", default=None, choices=("bf16", "fp8", "nvfp4"),
                        help="every budget fake-quantized with one set of scales: a QAD checkpoint's own, else "
                             "post-training quantization calibrated at every budget (default: as stored; a quantized "
                             "HF export always runs as its format)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="--precision PTQ: training micro-batches")
    parser.add_argument("--contiguous-budgets", action="store_true",
                        help="copy a budget's strided weight views into contiguous tensors (faster reads, more memory)")
    parser.add_argument("--cuda-graph", action="store_true", help="run each decode step as a captured CUDA graph (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="run each decode step compiled (torch.compile: inductor "
                        "on CPU, CUDA graphs on CUDA); one compile per budget and batch size, at start-up")
    parser.add_argument("--budgets-from", default=None,
                        help="serve at the budgets another elastic checkpoint of the same architecture records instead "
                             "of this checkpoint's own (a sorted parent at an elastic run's budgets: its untrained slices)")
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def job():
        from elastic_megatron.config.errors import ConfigError
        from elastic_megatron.serving.fleet import fleet_config
        from elastic_megatron.serving.options import ServeOptions, bind, exposure_warning

        options = ServeOptions(args.max_batch, args.max_queue, args.max_model_len, args.api_key, args.grace_period)
        options.check()  # before anything heavy is imported
        fleet = fleet_config(args.upstream, args.upstreams, args.upstream_timeout)
        if args.checkpoint is None and not fleet.upstreams:
            raise ConfigError("--checkpoint", None, "required (or budgets of upstream servers: --upstream / --upstreams)")
        if args.checkpoint is None:
            return front_end(args, fleet, options)

        import torch

        from elastic_megatron.inference.generator import ElasticGenerator
        from elastic_megatron.parallel.setup import distributed
        from elastic_megatron.serving.app import Server

        if args.cuda_graph and not torch.cuda.is_available():
            raise ConfigError("--cuda-graph", True, "needs a CUDA device; this machine has none")
        if args.cuda_graph and args.compile:
            raise ConfigError("--compile", True, "is a decode step of its own; choose it or --cuda-graph")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        name = args.model_name or fleet.model_name or Path(args.checkpoint).resolve().name
        with distributed(1, 1, 1, seed=args.seed):
            gen = ElasticGenerator.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, dtype=dtype,
                                                   precision=args.precision, calibration_batches=args.calibration_batches,
                                                   budgets_from=args.budgets_from, contiguous=args.contiguous_budgets,
                                                   cuda_graph=args.cuda_graph, compiled=args.compile)
            options.check(gen.cfg.max_sequence_length)  # the length limit: before the weights are read
            sock = bind(args.host, args.port)
            if fleet.upstreams:
                from elastic_megatron.serving.frontend import FrontEnd

                server = FrontEnd(fleet, name, options, gen=gen)
            else:
                server = Server(gen, name, options)
            warning = exposure_warning(args.host, args.api_key)
            if warning:
                print(warning, file=sys.stderr, flush=True)
            port = sock.getsockname()[1]
            print(f"budgets {server.served.budgets}, {options.max_batch} slots each of {server.served.max_len} positions: "
                  f"{server.scheduler.cache_bytes / 2**20:.1f} MiB of caches", file=sys.stderr, flush=True)
            print(f"serving {name} on http://{args.host}:{port}/v1", flush=True)
            server.run(sock, access_log=args.access_log)

    return run_tool(args, job, lambda _: "")


def front_end(args, fleet, options) -> None:
    """Budgets of upstream servers only: no weights here."""
    from elastic_megatron.config.errors import ConfigError

    name = args.model_name or fleet.model_name
    if not name:  # before anything heavy is imported
        raise ConfigError("--model-name", None, "required without --checkpoint (or model_name: in the --upstreams file)")
    from elastic_megatron.serving.frontend import FrontEnd, front_end_tokenizer
    from elastic_megatron.serving.options import bind, exposure_warning

    tokenizer_path = args.tokenizer or fleet.tokenizer
    tokenizer = front_end_tokenizer(tokenizer_path) if tokenizer_path else None
    sock = bind(args.host, args.port)
    server = FrontEnd(fleet, name, options, tokenizer=tokenizer)
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    port = sock.getsockname()[1]
    print(f"budgets {server.served.budgets}: upstreams " + ", ".join(f"{u.name}={u.config.url}" for u in
                                                                   server.upstreams.values()), file=sys.stderr, flush=True)
    print(f"serving {name} on http://{args.host}:{port}/v1", flush=True)
    server.run(sock, access_log=args.access_log)


if __name__ == "__main__":
    sys.exit(main())
