#!/usr/bin/env python3
"""SPDX 2.3 JSON SBOM of the crates linked into kms-plugin, from `cargo metadata`.

Only what ships: the package and its normal (not dev, not build) dependencies on Linux,
followed through the resolved graph with the features the build uses. Deterministic: the
creation time is SOURCE_DATE_EPOCH and nothing else depends on the machine, so the image and the
tarball that carry it stay reproducible.

Usage: scripts/sbom.py [--manifest-path Cargo.toml] > sbom.spdx.json
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys


def spdx_id(name, version):
    return "SPDXRef-crate-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"{name}-{version}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest-path", default="Cargo.toml")
    ap.add_argument("--target", default="x86_64-unknown-linux-gnu")
    args = ap.parse_args()
    meta = json.loads(
        subprocess.run(
            # --features cloud: what the release and the image build (scripts/release.sh).
            ["cargo", "metadata", "--format-version", "1", "--locked", "--features", "cloud",
             "--manifest-path", args.manifest_path, "--filter-platform", args.target],
            check=True, capture_output=True, text=True,
        ).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"] or meta["workspace_members"][0]

    # Walk normal dependencies only: build scripts and dev-dependencies do not ship.
    shipped, todo, edges = set(), [root], []
    while todo:
        pid = todo.pop()
        if pid in shipped:
            continue
        shipped.add(pid)
        for dep in nodes[pid]["deps"]:
            if any(k["kind"] is None for k in dep["dep_kinds"]):
                edges.append((pid, dep["pkg"]))
                todo.append(dep["pkg"])

    top = packages[root]
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    ids = sorted(shipped, key=lambda i: (packages[i]["name"], packages[i]["version"]))
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{top['name']}-{top['version']}",
        "documentNamespace": f"https://spdx.org/spdxdocs/{top['name']}-{top['version']}-{digest}",
        "creationInfo": {"created": created, "creators": ["Tool: scripts/sbom.py (cargo metadata)"]},
        "packages": [],
        "relationships": [
            {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
             "relatedSpdxElement": spdx_id(top["name"], top["version"])}
        ],
    }
    for pid in ids:
        p = packages[pid]
        source = p.get("source") or ""
        entry = {
            "SPDXID": spdx_id(p["name"], p["version"]),
            "name": p["name"],
            "versionInfo": p["version"],
            "downloadLocation": (
                f"https://crates.io/api/v1/crates/{p['name']}/{p['version']}/download"
                if source.startswith("registry+") else "NOASSERTION"
            ),
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": p.get("license") or "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "filesAnalyzed": False,
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": f"pkg:cargo/{p['name']}@{p['version']}",
            }],
        }
        doc["packages"].append(entry)
    for a, b in sorted(set(edges)):
        doc["relationships"].append({
            "spdxElementId": spdx_id(packages[a]["name"], packages[a]["version"]),
            "relationshipType": "DEPENDS_ON",
            "relatedSpdxElement": spdx_id(packages[b]["name"], packages[b]["version"]),
        })
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
