# polybroker container image: every listener of the README's port table, data in /data, config from the
# environment (POLYBROKER_<SECTION>_<KEY>). guest/guest only works from loopback, so give the
# first user with POLYBROKER_DEFAULT_USER / POLYBROKER_DEFAULT_PASS.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin polybroker \
    && mkdir -p /data /app && chown polybroker /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY protocols ./protocols
COPY storage ./storage
COPY cluster ./cluster
RUN pip install --no-cache-dir --no-compile . && rm -rf /root/.cache

ENV POLYBROKER_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
# MQTT, MQTT/TLS, AMQP, AMQP/TLS, STOMP, STOMP/TLS, WebSocket, WSS
EXPOSE 1883 8883 5672 5671 61613 61614 15675 15676

USER 10001
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 5672), 2).close()"]
# exec form: polybroker is PID 1 and gets SIGTERM directly (graceful stop, exit 0).
CMD ["polybroker", "serve"]
