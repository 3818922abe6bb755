"""Shared fixtures: the real packaged checkpoints (converted once per cache) and the phrasebank."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "financial_phrasebank"
PHRASEBANK_ZIP = SHARED_DATA / "FinancialPhraseBank-v1.0.zip"


@pytest.fixture(scope="session")
def packaged_folder():
    """name -> converted HF folder, from $MINILORA_CACHE (CI points it inside the clone)."""
    from minilora.packaged import resolve_packaged

    folders = {}

    def get(name: str) -> Path:
        if name not in folders:
            folders[name] = resolve_packaged(name)
        return folders[name]

    return get


@pytest.fixture(scope="session")
def phrasebank_zip() -> Path:
    if not PHRASEBANK_ZIP.is_file():
        pytest.fail(f"{PHRASEBANK_ZIP} is missing: tests read the FinancialPhraseBank zip from ../shared")
    return PHRASEBANK_ZIP
