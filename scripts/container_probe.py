#!/usr/bin/env python3
"""Small probes for scripts/container-test.sh (standard library only; no nats CLI, no jq needed).

    container_probe.py ports N                          N free TCP ports on 127.0.0.1
    container_probe.py publish HOST:PORT SUBJECT        JetStream-publish each stdin line as one
                                                        message, awaiting every PubAck
    container_probe.py consumer HOST:PORT STREAM DURABLE  "<pending> <ack_pending>" of a durable
    container_probe.py metrics URL FAMILY...            every FAMILY has a `# TYPE` line in the scrape
    container_probe.py prom-target PROM JOB SECONDS     the job's targets are all up
    container_probe.py prom-rules PROM SECONDS          every rule has been evaluated, health ok
    container_probe.py prom-alert PROM ALERT STATE SECONDS  the alert reaches STATE (pending|firing)

A check that fails prints why on stderr and exits 1; waits poll until SECONDS have passed.
"""

import json
import socket
import sys
import time
import urllib.request
import uuid


def fail(msg):
    print(f"container_probe: {msg}", file=sys.stderr)
    sys.exit(1)


# --- NATS (the client protocol, enough for publish with reply and request/reply) -------------------


class Nats:
    def __init__(self, hostport, timeout=10.0):
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""
        info = self._line()
        if not info.startswith(b"INFO "):
            fail(f"{hostport} is not a NATS server: {info[:80]!r}")
        connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True, "protocol": 1, "name": "container-test"}
        self.sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        while True:
            line = self._line()
            if line == b"PONG":
                break
            if line.startswith(b"-ERR"):
                fail(f"NATS refused the connection: {line.decode(errors='replace')}")
        self.inbox = f"_INBOX.{uuid.uuid4().hex}"
        self.sock.sendall(f"SUB {self.inbox}.* 1\r\n".encode())

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            fail("NATS closed the connection")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _bytes(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def request(self, subject, payload=b""):
        """Publishes with a reply subject and returns (status header or None, body) of the answer."""
        reply = f"{self.inbox}.{uuid.uuid4().hex[:12]}"
        self.sock.sendall(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n")
        while True:
            line = self._line()
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            if line.startswith(b"-ERR"):
                fail(f"NATS error: {line.decode(errors='replace')}")
            parts = line.split()
            if not parts or parts[0] not in (b"MSG", b"HMSG"):
                continue
            if parts[0] == b"MSG":
                body, status = self._bytes(int(parts[-1])), None
            else:
                hlen, total = int(parts[-2]), int(parts[-1])
                data = self._bytes(total)
                head, body = data[:hlen], data[hlen:]
                first = head.split(b"\r\n", 1)[0].split()  # NATS/1.0 503
                status = first[1].decode() if len(first) > 1 else None
            if parts[1].decode() != reply:
                continue  # a late answer to an earlier request
            return status, body


def cmd_publish(hostport, subject):
    nc = Nats(hostport)
    acked, streams = 0, set()
    for line in sys.stdin.read().splitlines():
        if not line.strip():
            continue
        status, body = nc.request(subject, line.encode())
        if status == "503":
            fail(f"no stream captures {subject} (no responders)")
        try:
            ack = json.loads(body)
        except ValueError:
            fail(f"not a PubAck for {subject}: {body[:200]!r}")
        if "error" in ack or "stream" not in ack:
            fail(f"publish to {subject} refused: {ack}")
        acked += 1
        streams.add(ack["stream"])
    print(f"{acked} {','.join(sorted(streams))}")


def cmd_consumer(hostport, stream, durable):
    nc = Nats(hostport)
    _, body = nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{durable}")
    info = json.loads(body)
    if "error" in info:
        fail(f"consumer {durable} on {stream}: {info['error']}")
    print(f"{info['num_pending']} {info['num_ack_pending']}")


# --- HTTP -------------------------------------------------------------------------------------------


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def get_json(url):
    doc = json.loads(get(url))
    if doc.get("status") != "success":
        fail(f"{url}: {doc}")
    return doc["data"]


def poll(seconds, what, check):
    """Calls check() until it returns a true value (returned) or `seconds` pass (fails with the
    last explanation check() gave through the `why` list)."""
    deadline = time.monotonic() + seconds
    why = ["nothing yet"]
    while True:
        try:
            result = check(why)
        except OSError as e:
            why[0] = f"{type(e).__name__}: {e}"
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            fail(f"{what} not within {seconds} s: {why[0]}")
        time.sleep(0.5)


def cmd_metrics(url, families):
    text = get(url)
    typed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    missing = [f for f in families if f not in typed]
    if missing:
        fail(f"{url} lacks the families {missing} (it has {len(typed)}: {sorted(typed)})")
    print(f"{len(families)} families present of {len(typed)} exported")


def cmd_prom_target(prom, job, seconds):
    def check(why):
        targets = [t for t in get_json(f"{prom}/api/v1/targets?state=active")["activeTargets"] if t["labels"].get("job") == job]
        if not targets:
            why[0] = f"no active target of job {job}"
            return None
        down = [f"{t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}" for t in targets if t["health"] != "up"]
        why[0] = "; ".join(down)
        return None if down else targets

    targets = poll(seconds, f"every target of job {job} up", check)
    print(", ".join(t["scrapeUrl"] for t in targets))


def cmd_prom_rules(prom, seconds):
    def check(why):
        groups = get_json(f"{prom}/api/v1/rules")["groups"]
        rules = [(g["name"], r) for g in groups for r in g["rules"]]
        if not rules:
            why[0] = "no rules loaded"
            return None
        bad = [f"{g}/{r['name']}: {r['health']} {r.get('lastError', '')}" for g, r in rules if r["health"] != "ok"]
        why[0] = "; ".join(bad)
        return None if bad else rules

    rules = poll(seconds, "every rule evaluated without error", check)
    alerts = sum(1 for _, r in rules if r["type"] == "alerting")
    print(f"{len(rules)} rules ({alerts} alerting, {len(rules) - alerts} recording), all health ok")


def cmd_prom_alert(prom, alert, state, seconds):
    started = time.monotonic()

    def check(why):
        alerts = [a for a in get_json(f"{prom}/api/v1/alerts")["alerts"] if a["labels"].get("alertname") == alert]
        why[0] = f"{alert} is {[a['state'] for a in alerts] or 'inactive'}"
        return [a for a in alerts if a["state"] == state]

    hits = poll(seconds, f"{alert} {state}", check)
    labels = {k: v for k, v in hits[0]["labels"].items() if k != "alertname"}
    print(f"{alert} {state} after {time.monotonic() - started:.0f} s ({labels})")


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "ports":
        socks = [socket.socket() for _ in range(int(args[0]))]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        print(" ".join(str(s.getsockname()[1]) for s in socks))
        for s in socks:
            s.close()
    elif cmd == "publish":
        cmd_publish(*args)
    elif cmd == "consumer":
        cmd_consumer(*args)
    elif cmd == "metrics":
        cmd_metrics(args[0], args[1:])
    elif cmd == "prom-target":
        cmd_prom_target(args[0], args[1], float(args[2]))
    elif cmd == "prom-rules":
        cmd_prom_rules(args[0], float(args[1]))
    elif cmd == "prom-alert":
        cmd_prom_alert(args[0], args[1], args[2], float(args[3]))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
