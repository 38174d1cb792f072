"""Asset names on the command line: upper-cased, de-duplicated, unknown ones refused with the known list."""

import pytest
import typer

from synth_miner.cli_assets import checked_assets


def test_names_are_upper_cased_and_unknown_ones_refused() -> None:
    assert checked_assets([" btc", "ETH", "btc"], "--asset") == ["BTC", "ETH"]
    assert checked_assets(["doge"], "--asset", also={"DOGE"}) == ["DOGE"]  # a file stem the folder holds
    with pytest.raises(typer.BadParameter, match=r"unknown asset\(s\) SPY, FOO; known: .*SPYX"):
        checked_assets(["spy", "BTC", "foo"], "--lf-assets")
