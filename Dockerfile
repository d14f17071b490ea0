# proxy.py in a container: docker build -t openai-proxy . && docker run -p 8080:8080 -e OA_API_KEY=sk-... openai-proxy
FROM python:3.12-slim

# Listen on every interface inside the container; the port is published by `docker run -p`.
ENV HOST=0.0.0.0 \
    PORT=8080 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY proxy.py ./
COPY ui/ ./ui/

# A user with no login and no home to write to: the proxy needs neither. A numeric
# USER lets Kubernetes' runAsNonRoot check it.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
USER 10001

EXPOSE 8080

# Python's own urllib, so the image needs no curl; PORT may be overridden at run time.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=4)"]

# One process uses one core. Given several CPUs (docker run --cpus 4 -e WORKERS=auto), WORKERS=auto starts a
# worker per CPU of the container's limit; on Kubernetes, prefer replicas of one CPU each (docs/scaling.md).
# Exec form: proxy.py is PID 1 and gets SIGTERM itself, so running streams drain (DRAIN_TIMEOUT); with
# WORKERS it passes the signal on to them.
CMD ["python", "proxy.py"]
