"""Docstrings and comments cite only what the repository holds (D12)."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITED = re.compile(r"\b([A-Za-z0-9_./-]+\.md)\b")


def test_every_cited_document_exists():
    missing = []
    for top in ("gomodel", "tests", "twisted"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        for cited in CITED.findall(line):
                            if not any(os.path.exists(os.path.join(base, cited)) for base in (REPO, root)):
                                missing.append(f"{os.path.relpath(path, REPO)}:{number}: {cited}")
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)
