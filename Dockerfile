# Drawbridge: the API (default command) or the worker (`drawbridge worker`), as a non-root user.
# Build: docker build -t drawbridge .   Run: see "Run in a container" in README.md.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /srv/drawbridge
COPY pyproject.toml README.md alembic.ini gunicorn.conf.py ./
COPY app ./app
COPY migrations ./migrations
# Editable, as in development: `drawbridge db upgrade` finds migrations/ beside the app package. The
# bytecode is compiled here because the running user cannot write to the source tree.
RUN pip install -e . && python -m compileall -q app migrations gunicorn.conf.py

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH PORT=8000 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/drawbridge-metrics
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin drawbridge
COPY --from=build /opt/venv /opt/venv
COPY --from=build /srv/drawbridge /srv/drawbridge
WORKDIR /srv/drawbridge
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=3)"]
# Migrate, then serve. With several replicas, run `drawbridge db upgrade` once as its own step and start
# the replicas with `gunicorn -c gunicorn.conf.py app.wsgi:app`.
CMD ["sh", "-c", ": \"${DATABASE_URL:?set DATABASE_URL to a PostgreSQL URL}\" && drawbridge db upgrade && exec gunicorn -c gunicorn.conf.py app.wsgi:app"]
