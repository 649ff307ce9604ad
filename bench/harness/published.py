"""GoModel's own published benchmark (June 2026), the bar of `--protocol gomodel`.

Source: github.com/ENTERPILOT/GoModel, docs/2026-06-25_aws_gateway_benchmark/
(README.md: the method; RESULTS.md: these figures; remote/run-on-instance.sh,
remote/bench-tools/loadgen/main.go and mock/main.go: how they were taken).
Latency in ms (median of 2 trials), throughput in req/s, RSS in MB as
`docker stats` prints it (MiB), cold start in s. None: not published.
"""

SOURCE = ("ENTERPILOT/GoModel docs/2026-06-25_aws_gateway_benchmark/RESULTS.md "
          "(commit 857857f240937bf5e6a628a9c5026f543aa1e77a)")

MACHINE = ("AWS EC2 c7i.large: 2 vCPU (Intel Xeon, Sapphire Rapids), 4 GiB, non-burstable, Amazon Linux 2023; "
           "every process in Docker on that one box")

METHOD = {
    "n": 8000, "concurrency": 10, "trials": 2, "warmup": 200, "variant_warmup": 50, "max_wall_s": 10,
    "sweep": [1, 16, 128], "sweep_s": 8, "resource_s": 8,
}

# (variant, stream) -> {target: {figure: value}}; p50/p99 are the whole
# request (to the last event for streams), ttft the first `data:` line
LATENCY = {
    ("chat", False): {"direct": {"p50": 0.23, "p99": 2.77}, "gomodel": {"p50": 1.81, "p99": 6.88},
                      "bifrost": {"p50": 2.51, "p99": 18.27}, "portkey": {"p50": 9.70, "p99": 30.54},
                      "litellm": {"p50": 30.56, "p99": 39.26}},
    ("responses", False): {"direct": {"p50": 0.26, "p99": 2.33}, "gomodel": {"p50": 2.01, "p99": 7.28},
                           "bifrost": {"p50": 2.73, "p99": 16.55}, "portkey": {"p50": 9.07, "p99": 26.92},
                           "litellm": {"p50": 39.12, "p99": 48.60}},
    ("messages", False): {"direct": {"p50": 0.26, "p99": 2.23}, "gomodel": {"p50": 1.76, "p99": 6.59},
                          "bifrost": {"p50": 2.65, "p99": 19.08}, "portkey": None,
                          "litellm": {"p50": 61.06, "p99": 98.12}},
    ("chat", True): {"gomodel": {"ttft": 4.71, "p50": 4.95}, "bifrost": {"ttft": 9.02, "p50": 11.89},
                     "portkey": {"ttft": 27.97, "p50": 27.98}, "litellm": {"ttft": 151.94, "p50": 151.95}},
    ("responses", True): {"gomodel": {"ttft": 4.69, "p50": 5.00}, "bifrost": {"ttft": 12.87, "p50": 14.94},
                          "portkey": {"ttft": 27.90, "p50": 27.93}, "litellm": {"ttft": 47.53, "p50": 47.55}},
    ("messages", True): {"gomodel": {"ttft": 7.50, "p50": 8.38}, "bifrost": None, "portkey": None,
                         "litellm": {"ttft": 48.86, "p50": 48.89}},
}

# chat, sustained req/s by concurrency (time-boxed 8 s per point)
CAPACITY = {
    "direct": {1: 15510, 16: 29701, 128: 30015},
    "gomodel": {1: 2745, 16: 4928, 128: 4567},
    "bifrost": {1: 1885, 16: 3088, 128: 2904},
    "portkey": {1: 636, 16: 946, 128: 900},
    "litellm": {1: 227, 16: 324, 128: 254},
}

# cold start (compose up to the first 200 on a chat), peak RSS under load,
# average CPU % under load (100 = one core) and the req/s of that window
RESOURCES = {
    "gomodel": {"cold_start_s": 0.56, "peak_rss_mib": 37.0, "cpu_pct": 92.6, "load_rps": 4824},
    "portkey": {"cold_start_s": 1.05, "peak_rss_mib": 112.0, "cpu_pct": 116.9, "load_rps": 960},
    "bifrost": {"cold_start_s": 7.07, "peak_rss_mib": 143.0, "cpu_pct": 117.6, "load_rps": 2977},
    "litellm": {"cold_start_s": 25.49, "peak_rss_mib": 2272.3, "cpu_pct": 101.1, "load_rps": 261},
}

# issue 18's targets for gomodel under this protocol (same machine, same run):
# figure -> (bound, "max" | "min"); the rest ("the same lead on responses and
# messages") is read against GoModel's figures per variant
TARGETS = {
    "chat_p50": (1.0, "max"), "chat_p99": (3.5, "max"), "chat_stream_ttft": (2.0, "max"),
    "peak_chat_rps": (2 * 4928, "min"), "cold_start_s": (0.3, "max"), "peak_rss_mib": (37.0, "max"),
}
