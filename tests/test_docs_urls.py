"""docs/urls.md is executable: every URL in its tables opens the backend its row names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from replaysafe.brokers import broker_from_url
from replaysafe.ledger import ledger_from_url

DOC = Path(__file__).resolve().parents[1] / "docs" / "urls.md"


def _rows(section: str) -> list[str]:
    text = DOC.read_text().split(f"## {section}")[1].split("\n## ")[0]
    return re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE)


@pytest.mark.parametrize("url", _rows("Brokers"))
async def test_every_broker_url_in_the_doc_opens(url: str) -> None:
    broker = broker_from_url(url)
    assert "secret" not in repr(broker)
    await broker.close()


@pytest.mark.parametrize("url", _rows("Ledgers"))
async def test_every_ledger_url_in_the_doc_opens(url: str, tmp_path: Path) -> None:
    url = url.replace("/var/lib/app/", f"{tmp_path}/")
    ledger = ledger_from_url(url)
    assert "secret" not in repr(ledger)
    await ledger.close()


def test_the_doc_has_rows() -> None:
    assert len(_rows("Brokers")) >= 8 and len(_rows("Ledgers")) == 5
