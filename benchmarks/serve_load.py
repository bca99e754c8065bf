"""Load test for `llama-expert serve`: N concurrent clients (the official `openai` client), each sending
completions one after another; prints requests/s, generated tokens/s, latency percentiles and failures.

    llama-expert serve --model smollm2-135m --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --clients 1,4,16 --requests 8 --max-tokens 32
"""

import argparse
import os
import statistics
import threading
import time

import openai

from common import machine, today

PROMPTS = ["The history of", "def parse(line):", "Question: What is 12 times 7?\nAnswer:", "Once upon a time",
           "import numpy as np\n", "The capital of France is", "In mathematics, a prime number",
           "SELECT name FROM"]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run(url: str, key: str, model: str, clients: int, requests: int, max_tokens: int, stream: bool) -> dict:
    latencies, tokens, failures = [], [], []
    lock = threading.Lock()

    def client(index: int) -> None:
        api = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
        for r in range(requests):
            prompt = PROMPTS[(index + r) % len(PROMPTS)]
            started = time.perf_counter()
            try:
                if stream:
                    count = sum(1 for chunk in api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                                      temperature=0.7, stream=True)
                                if chunk.choices and chunk.choices[0].text)
                else:
                    reply = api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.7)
                    count = reply.usage.completion_tokens
            except openai.OpenAIError as exc:
                with lock:
                    failures.append(str(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens.append(count)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "failed": len(failures), "wall": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50": percentile(latencies, 50), "p90": percentile(latencies, 90), "p99": percentile(latencies, 99),
            "mean": statistics.mean(latencies) if latencies else float("nan"), "errors": failures[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("LLAMA_EXPERT_API_KEY", "none"))
    parser.add_argument("--model", help="served model id (default: the server's only model)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    model = args.model or openai.OpenAI(base_url=args.url, api_key=args.api_key).models.list().data[0].id
    print(f"serve load test: {args.url} model {model}, {args.requests} requests per client, max_tokens "
          f"{args.max_tokens}, {'streaming' if args.stream else 'not streaming'}, {today()}, client on "
          f"{machine('cpu')}")
    print("| clients | requests | failed | requests/s | tokens/s | latency p50 | p90 | p99 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients in (int(c) for c in args.clients.split(",")):
        r = run(args.url, args.api_key, model, clients, args.requests, args.max_tokens, args.stream)
        print(f"| {clients} | {r['requests']} | {r['failed']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['p50']:.2f} s | {r['p90']:.2f} s | {r['p99']:.2f} s |", flush=True)
        for error in r["errors"]:
            print(f"  error: {error}")


if __name__ == "__main__":
    main()
