# drawbridge: one process for QQ (OneBot v11 reverse WebSocket), Telegram and Discord.
#   docker build -t drawbridge .
#   docker run --env-file .env -v drawbridge-data:/data drawbridge
# Settings come from the environment (see .env.example); data (SQLite, secret.key, kept
# results) lives in the /data volume: back it up, the secret key is in it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY bot ./bot
COPY plugins ./plugins
COPY adapters ./adapters
RUN pip install . \
    && useradd --system --create-home --uid 10001 drawbridge \
    && mkdir -p /data \
    && chown drawbridge /data \
    && chmod 0700 /data

USER drawbridge
ENV DRAWBRIDGE_DATA_DIR=/data
VOLUME ["/data"]
# The OneBot endpoint for NapCat/LLOneBot (set HOST=0.0.0.0 and ONEBOT_ACCESS_TOKEN to use it).
EXPOSE 8080

ENTRYPOINT ["drawbridge"]
CMD ["run"]
