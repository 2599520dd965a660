# Drawbridge API image: small, non-root, migrations run before the server starts.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PORT=8000
WORKDIR /srv/drawbridge

RUN useradd --system --create-home --uid 10001 drawbridge
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install -e . && chown -R drawbridge /srv/drawbridge

USER drawbridge
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"
CMD ["sh", "-c", "drawbridge db upgrade && exec gunicorn app.wsgi:app --bind 0.0.0.0:${PORT} --workers 2 --threads 4"]
