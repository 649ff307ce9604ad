# gomodel: configured by environment variables only (VLLM_BASE_URL, GOMODEL_MASTER_KEY, ...).
# CPython 3.11, built with profile-guided and link-time optimisation as python.org's images are: on
# an unoptimised build a request costs about 1.2x the CPU, and on 3.12 or 3.13 more instructions than
# on 3.11 (bench/README.md, "The interpreter").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PORT=8080 GOMODEL_DATA_DIR=/data

WORKDIR /src
COPY setup.py README.md ./
COPY gomodel ./gomodel
COPY twisted ./twisted
# The otel extra (OTEL_ENABLED=true) is in by default, imported only when on; --build-arg GOMODEL_EXTRAS= leaves it out.
ARG GOMODEL_EXTRAS=otel
# tini as PID 1: it forwards SIGTERM to the gateway (which drains) and reaps what a worker that died leaves
# behind (its store writer, reparented to PID 1), which the gateway as PID 1 would leave a zombie.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir ".${GOMODEL_EXTRAS:+[$GOMODEL_EXTRAS]}" \
    # The entrypoint never asks Twisted's plugin system; `twistd` in the image does, so write its
    # plugin cache now: the non-root user cannot write site-packages later.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && python -c "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins as p; assert any(x.tapname == 'gomodel' for x in getPlugins(IPlugin, p) if hasattr(x, 'tapname'))" \
    # The gateway runs optimised (PYTHONOPTIMIZE=2 below: no docstrings, no asserts), 2.6 MiB less per
    # process: its bytecode, the standard library's and every package's, compiled now (the image never
    # writes bytecode at run time, and compiling at each start would cost about 0.3 s of it).
    && python -m compileall -q -o 2 -x '/(test|tests|idle_test)/' /usr/local/lib/python3.11 \
    && useradd --create-home --uid 10001 gomodel \
    && mkdir -p /data && chown gomodel /data \
    && rm -rf /src

USER gomodel
ENV PYTHONOPTIMIZE=2
WORKDIR /home/gomodel
EXPOSE 8080
# Liveness: GET /health on $PORT answered 200, with the image's Python and its socket module alone (-I -S: no
# site-packages, no urllib, about 15 ms and 8 MiB for a moment). A gateway listening elsewhere (--listen, a
# UNIX socket) needs its own: `docker run --health-cmd ...` or `--no-healthcheck`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-I", "-S", "-c", "import os, socket, sys; s = socket.create_connection(('127.0.0.1', int(os.environ.get('PORT', '8080'))), 4); s.sendall(b'GET /health HTTP/1.0\\r\\n\\r\\n'); sys.exit(s.recv(12)[9:12] != b'200')"]
# `twistd -n --pidfile= gomodel` (foreground, logs to stdout, no pid file, so a restarted container
# starts) without Twisted's plugin scan: see gomodel/cli.py; under tini (see above).
ENTRYPOINT ["tini", "--", "gomodel"]
