#!/usr/bin/env python3
"""Checks compose/docker-compose.yml without Docker (none runs where CI does): the structure
`docker compose config` would reject, and that it stays in sync with the repo: files it
mounts or builds exist, dependencies name real services, pinned versions match
compose/kafka.sh, and every `ebb` command line uses subcommands and flags the CLI has."""
import os
import re
import subprocess
import sys
from pathlib import Path

try:
    import yaml
except ImportError:  # a fresh machine may lack it; PyPI is reachable
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "pyyaml"], check=True)
    import yaml

path = Path(sys.argv[1] if len(sys.argv) > 1 else "compose/docker-compose.yml").resolve()
here = path.parent
repo = here.parent
errors = []
doc = yaml.safe_load(path.read_text())
services = doc.get("services") or {}
if not services:
    errors.append("no services")

kafka_sh = (here / "kafka.sh").read_text()
kafka_version = re.search(r"^KAFKA_VERSION=(\S+)", kafka_sh, re.M).group(1)
registry_version = re.search(r"^REGISTRY_VERSION=(\S+)", kafka_sh, re.M).group(1)
pom = (here / "kafka" / "pom.xml").read_text()
if f"<kafka.version>{kafka_version}</kafka.version>" not in pom:
    errors.append(f"compose/kafka/pom.xml does not pin Kafka {kafka_version}")

known_keys = {"image", "build", "environment", "ports", "volumes", "command", "entrypoint", "depends_on",
              "healthcheck", "restart"}
host_ports = set()
for name, svc in services.items():
    unknown = set(svc) - known_keys
    if unknown:
        errors.append(f"{name}: unexpected keys {sorted(unknown)}")
    if "image" not in svc and "build" not in svc:
        errors.append(f"{name}: neither image nor build")
    deps = svc.get("depends_on") or []
    for dep in (deps if isinstance(deps, list) else deps.keys()):
        if dep not in services:
            errors.append(f"{name}: depends_on unknown service {dep}")
    for p in svc.get("ports") or []:
        host = str(p).rsplit(":", 1)[0]
        if host in host_ports:
            errors.append(f"{name}: host port {host} used twice")
        host_ports.add(host)
    for v in svc.get("volumes") or []:
        src = str(v).split(":")[0]
        if src.startswith(".") and not (here / src).exists():
            errors.append(f"{name}: volume source {src} does not exist")
    build = svc.get("build")
    if isinstance(build, dict) and "dockerfile" in build:
        ctx = (here / build.get("context", ".")).resolve()
        if not (ctx / build["dockerfile"]).exists():
            errors.append(f"{name}: dockerfile {build['dockerfile']} not found in {ctx}")
    if isinstance(build, dict) and "dockerfile_inline" in build and "schema-registry" in build["dockerfile_inline"]:
        if f"@{registry_version}" not in build["dockerfile_inline"]:
            errors.append(f"{name}: registry version differs from compose/kafka.sh ({registry_version})")
    image = svc.get("image", "")
    if image.startswith("apache/kafka:") and image.split(":")[1] != kafka_version:
        errors.append(f"{name}: Kafka {image.split(':')[1]} differs from compose/kafka.sh ({kafka_version})")

# Every ebb invocation must parse: ask the CLI itself (--help per subcommand) when built.
ebb = Path(os.environ.get("CARGO_TARGET_DIR") or repo / "target") / "debug" / "ebb"
def ebb_lines():
    for name, svc in services.items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and svc.get("entrypoint") is None:
            yield name, cmd
        elif isinstance(cmd, list):
            for line in cmd:
                for part in str(line).split("&&"):
                    words = part.split()
                    if words and words[0] == "ebb":
                        yield name, words[1:]
if ebb.exists():
    for name, words in ebb_lines():
        sub = []
        for w in words:
            if w.startswith("-") or len(sub) == 2:
                break
            sub.append(w)
        flags = [w for w in words if w.startswith("--")]
        helptext = subprocess.run([str(ebb), *sub, "--help"], capture_output=True, text=True).stdout
        for f in flags:
            if f not in helptext:
                errors.append(f"{name}: `ebb {' '.join(sub)}` has no flag {f}")

if errors:
    print("docker-compose.yml: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"docker-compose.yml ok: {len(services)} services, Kafka {kafka_version}, registry {registry_version}")
