# The callfabric controller.
# The /phone page's script: JsSIP bundled with esbuild from the committed lock file.
FROM node:20-bookworm-slim AS phone
WORKDIR /phone
COPY controller/api/phone/package.json controller/api/phone/package-lock.json controller/api/phone/phone.js ./
RUN npm ci --no-audit --no-fund && npm run build

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 callfabric \
 && useradd --system --uid 10001 --gid 10001 --home-dir /srv/callfabric --create-home callfabric
WORKDIR /srv/callfabric
COPY pyproject.toml README.md ./
COPY controller ./controller
COPY --from=phone /phone/dist/phone.js ./controller/api/phone/dist/phone.js
RUN pip install --no-cache-dir . && rm -rf /root/.cache
COPY policies ./policies
# the edge policy, edge key and state volumes (compose) take these directories' owner on first use
RUN mkdir -p /srv/callfabric/edge /srv/callfabric/keys /srv/callfabric/state \
 && chown callfabric /srv/callfabric/edge /srv/callfabric/keys /srv/callfabric/state \
 && install -d -o callfabric -g 10001 -m 2770 /srv/callfabric/trunks
USER callfabric
ENV CALLFABRIC_POLICY_DIR=/srv/callfabric/policies \
    CALLFABRIC_HTTP_LISTEN=0.0.0.0:8460
EXPOSE 8460
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8460/healthz', timeout=2).status != 200)"
CMD ["callfabric", "run"]
