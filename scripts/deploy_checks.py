#!/usr/bin/env python3
"""Checks of the deployment files that need no container engine (run by scripts/check-deploy.sh).

    deploy_checks.py check          structure and cross-references of docker-compose.yml,
                                    Dockerfile, .dockerignore, monitoring/prometheus.yml and the
                                    Grafana provisioning and dashboard
    deploy_checks.py selftest       applies known-bad edits to a copy of the files and checks that
                                    `check` reports each one (the checks can fail)
    deploy_checks.py mirror-build   runs the Dockerfile's build stage (its COPY and RUN steps, read
                                    from the Dockerfile) in a scratch directory laid out like the
                                    image's, from a context filtered by .dockerignore, and checks
                                    the binary it produces is the real service

Every problem is printed; the exit code is 1 when there is any. Needs PyYAML.
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SERVICE_PORTS = {"PORT": "4102", "METRICS_PORT": "9464"}  # overridden by the Dockerfile's ENV
DEFAULT_PORTS = {"nats": 4222, "tls": 4222, "postgres": 5432, "postgresql": 5432, "http": 80, "https": 443}

problems = []


def problem(msg):
    problems.append(msg)


def interpolate(value):
    """Compose-style ${VAR:-default} / ${VAR-default} / ${VAR}: the default (empty when none)."""
    if not isinstance(value, str):
        return value
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}",
        lambda m: m.group(2) or "",
        value,
    )


# --- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions(text):
    """(instruction, argument) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, arg = buf.strip().partition(" ")
        out.append((instr.upper(), arg.strip()))
        buf = ""
    return out


def stages(instructions):
    result = []
    for instr, arg in instructions:
        if instr == "FROM":
            parts = arg.split()
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
            result.append({"from": parts[0], "name": name, "steps": []})
        elif result:
            result[-1]["steps"].append((instr, arg))
    return result


def dockerignore_rules():
    path = ROOT / ".dockerignore"
    rules = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            pat = os.path.normpath(line[1:] if neg else line).lstrip("/")
            rules.append((neg, pat))
    return rules


def _match(pat, path):
    # Docker's rules: `*` stays within a path segment, `**` spans segments.
    rx = ""
    i = 0
    while i < len(pat):
        if pat.startswith("**", i):
            rx += ".*"
            i += 2
        elif pat[i] == "*":
            rx += "[^/]*"
            i += 1
        elif pat[i] == "?":
            rx += "[^/]"
            i += 1
        else:
            rx += re.escape(pat[i])
            i += 1
    return re.fullmatch(rx, path) is not None


def ignored(rel, rules):
    """Whether the context path `rel` is excluded (a rule on a parent directory applies too;
    the last matching rule wins, as in Docker's pattern matcher)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, pat in rules:
        if any(_match(pat, c) for c in candidates):
            excluded = not neg
    return excluded


def context_files(rules):
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames if d not in (".git", "target")]
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if not ignored(rel, rules):
                yield rel


def check_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    st = stages(dockerfile_instructions(text))
    if len(st) < 2:
        problem("Dockerfile: expected a multi-stage build (build + runtime)")
        return {}
    build, runtime = st[0], st[-1]
    rules = dockerignore_rules()
    for rel in ("target/release/x", ".git/config", ".env"):
        if not ignored(rel, rules):
            problem(f".dockerignore: {rel.split('/')[0]} is not excluded from the build context")
    # Every COPY source of the build stage exists and survives .dockerignore.
    copies = [a for i, a in build["steps"] if i == "COPY" and not a.startswith("--from")]
    for arg in copies:
        for src in shlex.split(arg)[:-1]:
            p = ROOT / src
            if not p.exists():
                problem(f"Dockerfile: COPY source {src} does not exist")
            elif p.is_file() and ignored(src, rules):
                problem(f"Dockerfile: COPY source {src} is excluded by .dockerignore")
            elif p.is_dir() and all(ignored(os.path.relpath(f, ROOT), rules) for f in p.rglob("*") if f.is_file()):
                problem(f"Dockerfile: COPY source {src}/ is empty after .dockerignore")
    # Dependencies are built from Cargo.toml/Cargo.lock alone before the sources are copied.
    order = [(i, a) for i, a in build["steps"] if i in ("COPY", "RUN")]
    runs = [k for k, (i, a) in enumerate(order) if i == "RUN" and "cargo build --release --locked" in a]
    src_copy = [k for k, (i, a) in enumerate(order) if i == "COPY" and shlex.split(a)[0] == "src"]
    if len(runs) < 2 or not src_copy or not (runs[0] < src_copy[0] < runs[-1]):
        problem("Dockerfile: expected `cargo build --release --locked` once before COPY src (dependency layer) and once after")
    steps = dict()
    for i, a in runtime["steps"]:
        steps.setdefault(i, []).append(a)
    user = (steps.get("USER") or ["root"])[-1].split(":")[0]
    if user in ("root", "0"):
        problem("Dockerfile: the runtime stage must run as a non-root USER")
    exposed = " ".join(steps.get("EXPOSE", [])).split()
    for port in ("4102", "9464"):
        if port not in exposed:
            problem(f"Dockerfile: EXPOSE lacks {port}")
    if steps.get("STOPSIGNAL", [""])[-1] != "SIGTERM":
        problem("Dockerfile: STOPSIGNAL SIGTERM missing")
    hc = steps.get("HEALTHCHECK", [""])[-1]
    if not re.search(r'normalize-service"?\s*,?\s*"?healthcheck', hc):
        problem("Dockerfile: HEALTHCHECK must run `normalize-service healthcheck`")
    env = {}
    for a in steps.get("ENV", []):
        for kv in shlex.split(a):
            if "=" in kv:
                k, v = kv.split("=", 1)
                env[k] = v
    for k in IMAGE_SERVICE_PORTS:
        if k in env and env[k] not in exposed:
            problem(f"Dockerfile: ENV {k}={env[k]} is not EXPOSEd")
    return {"env": env, "exposed": exposed, "healthcheck": bool(hc)}


# --- compose --------------------------------------------------------------------------------------


def config_variables():
    # `.env.example` lists exactly the variables the service reads: the integration test
    # `deploy::` compares it with `config::VARIABLES`, which is derived from the config tables.
    names = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    if not names:
        problem(".env.example: no variables found")
    return names


def as_list(v):
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def env_of(svc):
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def port_pairs(svc):
    """(host port or None, container port) of `ports`."""
    out = []
    for p in as_list(svc.get("ports")):
        if isinstance(p, dict):
            out.append((str(p.get("published")) if p.get("published") else None, str(p["target"])))
            continue
        p = interpolate(str(p)).split("/")[0]
        parts = p.split(":")
        out.append((parts[-2] if len(parts) >= 2 else None, parts[-1]))
    return out


def builds_our_image(svc):
    b = svc.get("build")
    if b is None:
        return False
    ctx = b if isinstance(b, str) else b.get("context", ".")
    return (ROOT / ctx).resolve() == ROOT


def command_flag(cmd, *names):
    for i, tok in enumerate(cmd):
        for n in names:
            if tok == n and i + 1 < len(cmd):
                return cmd[i + 1]
            if tok.startswith(n + "="):
                return tok.split("=", 1)[1]
    return None


def check_compose(docker):
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc.get("services") or {}
    known_vars = config_variables()
    volumes_declared = set((doc.get("volumes") or {}).keys())

    def is_daemon(svc):
        cmd = as_list(svc.get("command"))
        return builds_our_image(svc) and (not cmd or cmd[0] == "run")

    # Ports each service listens on inside the network.
    listening = {}
    for name, svc in services.items():
        ports = {str(p) for p in as_list(svc.get("expose"))} | {c for _, c in port_pairs(svc)}
        if builds_our_image(svc):
            env = {**IMAGE_SERVICE_PORTS, **docker.get("env", {}), **env_of(svc)}
            if is_daemon(svc):
                own = {env["PORT"], env["METRICS_PORT"]}
                for c in {c for _, c in port_pairs(svc)} | {str(p) for p in as_list(svc.get("expose"))}:
                    if c not in own:
                        problem(f"compose {name}: container port {c} is not PORT/METRICS_PORT ({sorted(own)})")
                ports = own
        listening[name] = ports
    cmd = [interpolate(str(c)) for c in as_list(services.get("nats", {}).get("command"))]
    if "nats" in services:
        nport = command_flag(cmd, "--port", "-p") or "4222"
        mport = command_flag(cmd, "--http_port", "-m")
        if not any(c in ("-js", "--jetstream") for c in cmd):
            problem("compose nats: JetStream is not enabled (-js / --jetstream)")
        if not mport:
            problem("compose nats: no monitoring port (-m / --http_port)")
        actual = {nport} | ({mport} if mport else set())
        if listening["nats"] - actual - {"6222"}:
            problem(f"compose nats: exposes {sorted(listening['nats'])} but the server listens on {sorted(actual)}")
        listening["nats"] = actual
        m = re.match(r"nats:(\d+)\.(\d+)", services["nats"].get("image", ""))
        if not m or (int(m.group(1)), int(m.group(2))) < (2, 10):
            problem("compose nats: image must be nats 2.10 or later")
    else:
        problem("compose: no nats service")
    if not re.match(r"postgres:16", (services.get("postgres") or {}).get("image", "")):
        problem("compose postgres: image must be PostgreSQL 16")
    for required in ("normalize-service", "prometheus", "grafana"):
        if required not in services:
            problem(f"compose: no {required} service")

    host_ports = {}
    for name, svc in services.items():
        # depends_on targets exist, and a health condition has a health check to wait for.
        deps = svc.get("depends_on") or {}
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            if dep not in services:
                problem(f"compose {name}: depends_on unknown service {dep}")
                continue
            cond = (spec or {}).get("condition", "service_started")
            target = services[dep]
            if cond == "service_healthy" and not (target.get("healthcheck") or (builds_our_image(target) and docker.get("healthcheck"))):
                problem(f"compose {name}: waits for {dep} to be healthy, but {dep} has no health check")
            if cond == "service_completed_successfully" and target.get("restart", "no") != "no":
                problem(f"compose {name}: waits for {dep} to complete, but {dep} restarts")
            if set(as_list(target.get("profiles"))) - set(as_list(svc.get("profiles"))):
                problem(f"compose {name}: depends on {dep}, which only runs in a profile")
        # URLs in the environment point at a service and a port it listens on.
        for key, value in env_of(svc).items():
            for url in value.split(","):
                m = re.match(r"^([a-z][a-z0-9+.-]*)://(?:[^@/]*@)?([^:/?#]+)(?::(\d+))?", url.strip())
                if not m:
                    continue
                scheme, host, port = m.group(1), m.group(2), m.group(3)
                port = port or str(DEFAULT_PORTS.get(scheme, ""))
                if host in ("localhost", "127.0.0.1"):
                    problem(f"compose {name}: {key} points at {host}, which inside a container is the container itself")
                elif host not in services:
                    problem(f"compose {name}: {key} host {host} is not a compose service")
                elif port not in listening.get(host, set()):
                    problem(f"compose {name}: {key} uses {host}:{port}, but {host} listens on {sorted(listening.get(host, []))}")
        # Variables given to the service are ones it reads.
        if builds_our_image(svc):
            for key in env_of(svc):
                if key not in known_vars:
                    problem(f"compose {name}: sets {key}, which the service does not read (.env.example, checked against config::VARIABLES)")
        # Host ports are unique (profiles included: the pair runs next to the default stack).
        for host, _ in port_pairs(svc):
            if host:
                if host in host_ports:
                    problem(f"compose {name}: host port {host} is also published by {host_ports[host]}")
                host_ports[host] = name
        # Bind mounts exist; named volumes are declared.
        for v in as_list(svc.get("volumes")):
            src = v.get("source") if isinstance(v, dict) else str(v).split(":")[0]
            if src.startswith((".", "/")):
                if not (ROOT / src).exists():
                    problem(f"compose {name}: mounts {src}, which does not exist")
            elif src not in volumes_declared:
                problem(f"compose {name}: volume {src} is not declared")
        # Daemons get time to finish their in-flight batch before SIGKILL.
        if is_daemon(svc):
            grace = str(svc.get("stop_grace_period", "10s"))
            m = re.fullmatch(r"(\d+)s", grace)
            shutdown_ms = int(env_of(svc).get("SHUTDOWN_TIMEOUT_MS", "25000"))
            if not m or int(m.group(1)) * 1000 <= shutdown_ms:
                problem(f"compose {name}: stop_grace_period {grace} must exceed SHUTDOWN_TIMEOUT_MS {shutdown_ms} ms")

    # The topology one-shot, and daemons that wait for it.
    topo = [n for n, s in services.items() if builds_our_image(s) and as_list(s.get("command"))[:2] == ["topology", "apply"]]
    if len(topo) != 1:
        problem("compose: expected one one-shot service running `topology apply`")
    else:
        t = topo[0]
        mode = command_flag([interpolate(str(c)) for c in services[t]["command"]], "--mode")
        if mode not in ("single", "multi"):
            problem(f"compose {t}: --mode {mode!r} is not single|multi")
        for name, svc in services.items():
            if is_daemon(svc):
                deps = svc.get("depends_on") or {}
                if isinstance(deps, list) or (deps.get(t) or {}).get("condition") != "service_completed_successfully":
                    problem(f"compose {name}: must wait for {t} to complete successfully")

    # The blue-green pair: same image and durables, one single and one multi, own host ports.
    pair = {n: s for n, s in services.items() if "bluegreen" in as_list(s.get("profiles"))}
    modes = sorted(env_of(s).get("EVENT_STREAM_MODE", "multi") for s in pair.values())
    if modes != ["multi", "single"]:
        problem(f"compose profile bluegreen: expected one single and one multi instance, got {modes}")
    else:
        envs = [env_of(s) for s in pair.values()]
        for key in sorted(known_vars):
            if ("DURABLE" in key or key.endswith("_SUBJECT") or key.startswith("STREAM_")) and envs[0].get(key) != envs[1].get(key):
                problem(f"compose profile bluegreen: {key} differs between the pair (they must share the durables)")
        if not all(is_daemon(s) for s in pair.values()):
            problem("compose profile bluegreen: both instances must run the daemon from this Dockerfile")
    return doc, services, listening


# --- Prometheus and Grafana -----------------------------------------------------------------------


def mounts(svc):
    """container path -> host path (relative to ROOT) of bind mounts."""
    out = {}
    for v in as_list(svc.get("volumes")):
        parts = str(v).split(":")
        if parts[0].startswith((".", "/")):
            out[parts[1]] = os.path.normpath(parts[0])
    return out


def host_path_for(container_path, mount_map):
    for target, src in sorted(mount_map.items(), key=lambda kv: -len(kv[0])):
        if container_path == target:
            return src
        if container_path.startswith(target.rstrip("/") + "/"):
            return os.path.join(src, os.path.relpath(container_path, target))
    return None


def check_prometheus(services, listening, docker):
    prom = services.get("prometheus")
    if not prom:
        return
    mount_map = mounts(prom)
    cmd = [str(c) for c in as_list(prom.get("command"))]
    config_path = command_flag(cmd, "--config.file") or "/etc/prometheus/prometheus.yml"
    host_config = host_path_for(config_path, mount_map)
    if host_config != "monitoring/prometheus.yml":
        problem(f"compose prometheus: {config_path} is not mounted from monitoring/prometheus.yml")
        return
    cfg = yaml.safe_load((ROOT / host_config).read_text())
    for rf in cfg.get("rule_files") or []:
        container = rf if rf.startswith("/") else os.path.join(os.path.dirname(config_path), rf)
        host = host_path_for(container, mount_map)
        if host != "monitoring/alerts.yml":
            problem(f"prometheus rule file {rf} ({container}) is not mounted from monitoring/alerts.yml (got {host})")
    if not cfg.get("rule_files"):
        problem("monitoring/prometheus.yml loads no rule files")
    daemons = {n for n, s in services.items() if builds_our_image(s) and (not as_list(s.get("command")) or as_list(s.get("command"))[0] == "run")}
    scraped = set()
    jobs = set()
    for job in cfg.get("scrape_configs") or []:
        jobs.add(job.get("job_name"))
        targets = []
        for sd in job.get("dns_sd_configs") or []:
            targets += [(n, str(sd.get("port"))) for n in sd.get("names", [])]
        for sc in job.get("static_configs") or []:
            targets += [tuple(t.rsplit(":", 1)) for t in sc.get("targets", [])]
        for host, port in targets:
            if host not in services:
                problem(f"prometheus job {job.get('job_name')}: target {host} is not a compose service")
            elif port not in listening.get(host, set()):
                problem(f"prometheus job {job.get('job_name')}: {host}:{port}, but {host} listens on {sorted(listening[host])}")
            else:
                metrics_port = {**IMAGE_SERVICE_PORTS, **docker.get("env", {}), **env_of(services[host])}["METRICS_PORT"]
                if host in daemons and port != metrics_port:
                    problem(f"prometheus: scrapes {host}:{port}, not its METRICS_PORT {metrics_port}")
                scraped.add(host)
    for d in daemons - scraped:
        problem(f"prometheus: service {d} is not scraped")
    alerts = (ROOT / "monitoring/alerts.yml").read_text()
    for job in set(re.findall(r'up\{[^}]*job="([^"]+)"', alerts)):
        if job not in jobs:
            problem(f"monitoring/alerts.yml selects up{{job=\"{job}\"}}, not a job of monitoring/prometheus.yml ({sorted(jobs)})")


def walk_json(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk_json(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk_json(v, key)


def check_grafana(services, listening):
    graf = services.get("grafana")
    if not graf:
        return
    mount_map = mounts(graf)
    prov = host_path_for("/etc/grafana/provisioning", mount_map)
    if not prov:
        problem("compose grafana: /etc/grafana/provisioning is not mounted")
        return
    uids = {}
    for f in sorted((ROOT / prov / "datasources").glob("*.y*ml")):
        for ds in yaml.safe_load(f.read_text()).get("datasources", []):
            uids[ds.get("uid")] = ds
            m = re.match(r"https?://([^:/]+):(\d+)", ds.get("url", ""))
            if not m or m.group(1) not in services or m.group(2) not in listening.get(m.group(1), set()):
                problem(f"grafana datasource {ds.get('name')}: url {ds.get('url')} is not a compose service port")
    if not uids:
        problem("grafana: no provisioned datasource")
    dash_dirs = []
    for f in sorted((ROOT / prov / "dashboards").glob("*.y*ml")):
        for p in yaml.safe_load(f.read_text()).get("providers", []):
            dash_dirs.append(p.get("options", {}).get("path"))
    dash_host = "monitoring/grafana/normalize-service.json"
    mounted_at = [c for c, h in mount_map.items() if h == dash_host]
    if not mounted_at or not any(d and os.path.dirname(mounted_at[0]) == d.rstrip("/") for d in dash_dirs):
        problem(f"grafana: {dash_host} is not mounted into a provisioned dashboard path ({dash_dirs})")
    try:
        dash = json.loads((ROOT / dash_host).read_text())
    except ValueError as e:
        problem(f"{dash_host}: not JSON: {e}")
        return
    for ds in walk_json(dash, "datasource"):
        uid = ds.get("uid") if isinstance(ds, dict) else ds
        if uid not in uids:
            problem(f"{dash_host}: datasource uid {uid!r} is not provisioned ({sorted(uids)})")
    ids = [p.get("id") for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        problem(f"{dash_host}: duplicate panel ids")
    names = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    if not {"stream", "durable"} <= names:
        problem(f"{dash_host}: needs the variables stream and durable (has {sorted(names)})")
    for p in dash.get("panels", []):
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var in set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__interval", "__range"}:
                if var not in names:
                    problem(f"{dash_host}: panel {p.get('title')!r} uses ${var}, which is not a variable")
    if not dash.get("uid"):
        problem(f"{dash_host}: no uid")


def check():
    docker = check_dockerfile()
    try:
        _, services, listening = check_compose(docker)
    except (OSError, yaml.YAMLError) as e:
        problem(f"docker-compose.yml: {e}")
        return
    check_prometheus(services, listening, docker)
    check_grafana(services, listening)


# --- the build stage, without a container engine ----------------------------------------------------


def mirror_build():
    st = stages(dockerfile_instructions((ROOT / "Dockerfile").read_text()))
    build = st[0]
    rules = dockerignore_rules()
    scratch = Path(tempfile.mkdtemp(prefix="docker-mirror-"))
    context = scratch / "context"
    for rel in context_files(rules):
        dest = context / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)  # keeps mtimes, as COPY does
    root = scratch / "fs"
    workdir = root
    env = {k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"}
    cache = os.environ.get("MIRROR_TARGET_DIR")
    print(f"mirror: context {context} ({sum(1 for _ in context.rglob('*') if _.is_file())} files), filesystem {root}")
    try:
        for instr, arg in build["steps"]:
            if instr == "WORKDIR":
                workdir = root / arg.lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
                if cache:
                    # Reuse compiled dependencies between CI runs; the steps still run in order.
                    Path(cache).mkdir(parents=True, exist_ok=True)
                    if not (workdir / "target").exists():
                        os.symlink(cache, workdir / "target")
            elif instr == "COPY":
                *srcs, dest = shlex.split(arg)
                dest_path = workdir / dest if not dest.startswith("/") else root / dest.lstrip("/")
                for s in srcs:
                    sp = context / s
                    if not sp.exists():
                        problem(f"mirror: COPY {s}: not in the build context (.dockerignore?)")
                        return
                    if sp.is_dir():
                        shutil.copytree(sp, dest_path if not dest.endswith("/") else dest_path / sp.name, copy_function=shutil.copy2, dirs_exist_ok=True)
                    else:
                        target = dest_path / sp.name if dest.endswith("/") or dest_path.is_dir() else dest_path
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(sp, target)
            elif instr == "RUN":
                print(f"mirror: RUN {arg}", flush=True)
                if subprocess.run(["sh", "-c", arg], cwd=workdir, env=env).returncode != 0:
                    problem(f"mirror: RUN failed: {arg}")
                    return
            elif instr in ("ARG", "ENV", "LABEL"):
                continue
            else:
                problem(f"mirror: build-stage instruction {instr} is not mirrored")
                return
        binary = workdir / "target/release/normalize-service"
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
        if out.returncode != 0 or "healthcheck" not in out.stdout or "topology" not in out.stdout:
            problem(f"mirror: {binary} is not the service (the dependency stub was shipped?): {out.stdout!r} {out.stderr!r}")
        else:
            size = binary.stat().st_size
            print(f"mirror: built {binary} ({size // 1024} KiB); `--help` lists the service's commands")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# Each edit must make `check` fail with a message containing the given text.
MUTATIONS = [
    ("docker-compose.yml", "NATS_URL: nats://nats:4222", "NATS_URL: nats://nats:4223", "uses nats:4223"),
    ("docker-compose.yml", "@postgres:5432/", "@localhost:5432/", "the container itself"),
    ("docker-compose.yml", "  LOG_FORMAT: json", "  LOG_FORMATS: json", "sets LOG_FORMATS"),
    ("docker-compose.yml", "      EVENT_STREAM_MODE: single", "      EVENT_STREAM_MODE: multi", "one single and one multi"),
    ("docker-compose.yml", '      - "4122:4102"', '      - "4112:4102"', "host port 4112"),
    ("docker-compose.yml", "stop_grace_period: 30s", "stop_grace_period: 20s", "stop_grace_period"),
    ("docker-compose.yml", "    postgres:\n      condition: service_healthy\n    nats-topology:", "    postgress:\n      condition: service_healthy\n    nats-topology:", "unknown service postgress"),
    ("docker-compose.yml", "./monitoring/alerts.yml:/etc/prometheus/alerts.yml", "./monitoring/alert.yml:/etc/prometheus/alerts.yml", "does not exist"),
    ("docker-compose.yml", '"--http_port", "8222"', '"--http_port", "8223"', "listens on"),
    ("Dockerfile", "USER 10001:10001", "USER root", "non-root"),
    ("Dockerfile", "EXPOSE 4102 9464", "EXPOSE 4102", "EXPOSE lacks 9464"),
    ("Dockerfile", 'normalize-service", "healthcheck"', 'normalize-service", "run"', "HEALTHCHECK"),
    (".dockerignore", "!src\n", "", "COPY source src"),
    (".dockerignore", "*\n", "", "not excluded"),
    ("monitoring/prometheus.yml", "names: [normalize-service,", "names: [normalize,", "not a compose service"),
    ("monitoring/prometheus.yml", "job_name: normalize-service", "job_name: normalize", "not a job of"),
    ("monitoring/grafana/provisioning/datasources/prometheus.yml", "uid: prometheus", "uid: prom", "is not provisioned"),
    ("monitoring/grafana/normalize-service.json", '"name": "durable"', '"name": "consumer"', "needs the variables"),
]


def selftest():
    tmp = Path(tempfile.mkdtemp(prefix="deploy-selftest-"))
    files = ["Dockerfile", ".dockerignore", "docker-compose.yml", ".env.example", "Cargo.toml", "Cargo.lock", "build.rs"]
    try:
        shutil.copytree(ROOT / "monitoring", tmp / "monitoring")
        shutil.copytree(ROOT / "src", tmp / "src")
        shutil.copytree(ROOT / "migrations", tmp / "migrations")
        (tmp / "scripts").mkdir()
        shutil.copy2(__file__, tmp / "scripts" / "deploy_checks.py")
        for f in files:
            shutil.copy2(ROOT / f, tmp / f)
        script = str(tmp / "scripts" / "deploy_checks.py")
        base = subprocess.run([sys.executable, script, "check"], capture_output=True, text=True)
        if base.returncode != 0:
            problem(f"selftest: the unmodified copy fails: {base.stdout}")
            return
        for rel, old, new, expected in MUTATIONS:
            path = tmp / rel
            original = path.read_text()
            if old not in original:
                problem(f"selftest: {rel} no longer contains {old!r}; update MUTATIONS")
                continue
            path.write_text(original.replace(old, new, 1))
            out = subprocess.run([sys.executable, script, "check"], capture_output=True, text=True)
            path.write_text(original)
            if out.returncode == 0 or expected not in out.stdout:
                problem(f"selftest: editing {rel} ({old!r} -> {new!r}) was not reported as {expected!r}: {out.stdout}")
        print(f"selftest: {len(MUTATIONS)} known-bad edits checked")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd == "check":
        check()
    elif cmd == "selftest":
        selftest()
    elif cmd == "mirror-build":
        mirror_build()
    else:
        print(__doc__)
        return 2
    for p in problems:
        print(f"  FAIL {p}")
    if problems:
        print(f"{cmd}: {len(problems)} problem(s)")
        return 1
    print(f"{cmd}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
