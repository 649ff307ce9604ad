"""gomodel: an OpenAI-compatible AI gateway on Twisted, built to front vLLM."""

from setuptools import find_packages, setup

OTEL = [
    "opentelemetry-api>=1.27,<2",
    "opentelemetry-sdk>=1.27,<2",
    "opentelemetry-exporter-otlp-proto-http>=1.27,<2",
]

setup(
    name="gomodel",
    version="0.1.0",
    description="OpenAI-compatible AI gateway in front of vLLM and other OpenAI-compatible providers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted.plugins has no __init__.py on purpose (Twisted's own package must
    # stay in charge of it), so find_packages cannot see it: name it.
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]) + ["twisted.plugins"],
    # The admin dashboard's page and assets (HTML, ES modules, CSS, the vendored Chart.js and its licence).
    package_data={"gomodel.dashboard": ["static/*", "static/pages/*", "static/vendor/*"]},
    install_requires=[
        # Ceilings: the code touches private Twisted and klein names; raise
        # one only after the test suite passes on the new release.
        "twisted[tls]>=24.7,<27",
        "klein>=24.8,<25",
        "pyyaml>=6.0",
        "hyperlink>=21.0",
        # orjson parses and writes request bodies several times faster than the
        # standard library on the hot path; answers are never re-serialised.
        "orjson>=3.9",
        # multipart (the parser bottle uses) parses uploads as they arrive
        # (PushMultipartParser), so a 512 MB file goes to disk in small chunks;
        # the standard library's email/cgi parsers need the whole body in memory.
        "multipart>=1.2",
        # httptools is Node.js's HTTP/1.1 parser, llhttp, for Python (uvicorn's): requests are parsed in C
        # (gomodel.http.channel), a third of what Twisted's line-by-line parser cost per relayed request.
        "httptools>=0.6",
        # The Prometheus text exposition and its metric types (GoModel's series and ours):
        # the format's own reference library rather than a hand-written exposition.
        "prometheus_client>=0.20,<1",
        # Rate-limit and budget counters shared by workers and gateways through Redis
        # (REDIS_URL): redis-py is the client Redis itself maintains (Lua Script objects with
        # EVALSHA, connection pooling); it runs in a small owned thread pool, off the reactor.
        "redis>=5,<9",
        # STORAGE_TYPE=postgresql (several gateway hosts on one database): psycopg 3 is the
        # maintained PostgreSQL driver (server-side parameters, COPY, typed errors telling a lost
        # connection from a bad statement); psycopg-pool is its own connection pool, which checks a
        # connection before lending it and replaces broken ones. Both run in an owned thread pool,
        # off the reactor. The binary extra ships libpq, so no system library is needed.
        "psycopg[binary]>=3.2,<4",
        "psycopg-pool>=3.2,<4",
        # The IANA time zone database, where the system's lacks a name (X-GoModel-Timezone): Debian 13, the
        # image's, leaves the links browsers send (Chromium's Asia/Calcutta, Europe/Kiev) to tzdata-legacy.
        "tzdata>=2024.1",
    ],
    extras_require={
        # OpenTelemetry (OTEL_ENABLED=true): the official API and SDK, exporting over OTLP/HTTP
        # (protobuf). Imported only when it is on; the gateway runs without them.
        "otel": OTEL,
        # The tests run the OpenTelemetry export against a real OTLP receiver (opentelemetry-proto,
        # which the exporter brings, decodes what arrives).
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            # pytest-xdist: pytest.ini's `-n 4 --dist loadgroup` runs the suite in four worker processes; it mostly
            # waits on sockets, subprocesses and PostgreSQL, and in one process (`-n 0`) takes about 9 minutes on
            # two cores.
            "pytest-xdist>=3.5,<4",
            # The tests' own HTTP client. The gateway sends every upstream request, its own model
            # lists and probes included, through its relay client (gomodel/upstream/client.py).
            "treq>=24.9,<27",
            "openai>=1.40",
            # The official Anthropic SDK reads the /v1/messages answers and event streams in the tests.
            "anthropic>=0.40",
            # The dashboard's browser test drives Debian's chromium through its chromium-driver
            # (no browser download); selenium is the client of that WebDriver.
            "selenium>=4.20,<5",
        ] + OTEL,
    },
    entry_points={"console_scripts": ["gomodel = gomodel.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
