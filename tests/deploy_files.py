"""Readers for the deployment files, for tests that check what no Docker engine or cluster can run here.

- ``compose``: a compose file with its ``${VAR}`` interpolation (``:-``, ``-``, ``:?``, ``?``, ``$$``) applied
  from an env file, as ``docker compose config`` would before validating it;
- ``dockerfile``: the instructions of each build stage (continuation lines joined, comments dropped, exec-form
  JSON arrays parsed, ``ENV`` pairs split);
- ``network policies``: whether Kubernetes NetworkPolicies let one pod reach another on a port, for pods
  selected by ``matchLabels`` in one namespace (all this project's manifests use).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# -- compose ---------------------------------------------------------------------------------------------------
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.DOTALL)


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return env.get(match.group("plain"), "")
        spec = _BRACED.match(match.group("braced"))
        if spec is None:
            raise ValueError(f"bad interpolation {match.group(0)!r}")
        name, op, arg = spec.group("name"), spec.group("op"), spec.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else interpolate(arg, env)
        if op == "-":
            return value if value is not None else interpolate(arg, env)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"required variable {name} is not set: {arg}")
        if op == ":+":
            return interpolate(arg, env) if value else ""
        if op == "+":
            return interpolate(arg, env) if value is not None else ""
        return value or ""

    return _VAR.sub(one, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose model: YAML merge keys resolved, ``x-`` extension fields dropped, variables interpolated
    (when ``env`` is given)."""
    model = yaml.safe_load(path.read_text())
    model = {k: v for k, v in model.items() if not k.startswith("x-")}
    return _interpolate_tree(model, env) if env is not None else model


# -- Dockerfiles -----------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        text = self.value.strip()
        if text.startswith("["):
            return json.loads(text)
        return None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """``ENV`` pairs in order (``$VAR`` references to earlier pairs or the given environment kept as text)."""
        out: dict[str, str] = {}
        for instruction in self.all("ENV"):
            tokens = shlex.split(instruction.value)
            if tokens and "=" not in tokens[0]:  # legacy form: ENV KEY value with spaces
                out[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                out[key] = value
        return out


def parse_dockerfile(path: Path) -> list[Stage]:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = value.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif keyword == "ARG" and not stages:
            continue
        else:
            stages[-1].instructions.append(Instruction(keyword, value.strip()))
    return stages


def healthcheck_command(instruction: Instruction) -> list[str]:
    """The command of ``HEALTHCHECK [OPTIONS] CMD ...`` (exec form)."""
    _, _, command = instruction.value.partition("CMD ")
    return json.loads(command)


# -- Kubernetes NetworkPolicy ------------------------------------------------------------------------------------
def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return False
    if set(selector) - {"matchLabels"}:
        raise NotImplementedError(f"only matchLabels selectors are understood, got {sorted(selector)}")
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _port_ok(rule: Mapping[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("port") in (port, None) and p.get("protocol", "TCP") == protocol for p in ports)


def ingress_allowed(policies: list[Mapping[str, Any]], source: Mapping[str, str], target: Mapping[str, str],
                    port: int, protocol: str = "TCP") -> bool:
    """Whether a pod labelled ``source`` (same namespace) may open ``port`` on a pod labelled ``target``: allowed
    if no policy selects the target for Ingress, else if any selecting policy has a matching ingress rule."""
    selecting = [p for p in policies if _selects(p["spec"].get("podSelector", {}), target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            peer_ok = not peers or any(
                "podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], source)
                for peer in peers)
            if peer_ok and _port_ok(rule, port, protocol):
                return True
    return False


def egress_allowed(policies: list[Mapping[str, Any]], source: Mapping[str, str], port: int,
                   protocol: str = "TCP", to_dns: bool = False) -> bool:
    """Whether a pod labelled ``source`` may open ``port`` anywhere (``to_dns``: to the cluster DNS pods)."""
    selecting = [p for p in policies if _selects(p["spec"].get("podSelector", {}), source)
                 and "Egress" in p["spec"].get("policyTypes", [])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("egress") or []:
            peers = rule.get("to")
            dns_peer = any(_selects(peer.get("podSelector"), {"k8s-app": "kube-dns"}) for peer in peers or [])
            if (not peers or (to_dns and dns_peer)) and _port_ok(rule, port, protocol):
                return True
    return False
