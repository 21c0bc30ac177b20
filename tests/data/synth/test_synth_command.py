"""`neurofed synth` argument handling and summary."""

import argparse

import pytest

from neurofed.data.synth.command import add_arguments, run, site_sizes


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_command_writes_sites_and_prints_summary(tmp_path, capsys):
    rc = run(parse(["--out", str(tmp_path), "--sites", "ixi,SALD", "--subjects", "6", "--resolution", "4",
                    "--sizes", "equal", "--no-progress"]))
    assert rc == 0
    assert (tmp_path / "ixi" / "participants.tsv").exists() and (tmp_path / "sald" / "participants.tsv").exists()
    out = capsys.readouterr().out
    assert "subjects" in out and "s/subject" in out
    ixi_line = next(line for line in out.splitlines() if line.startswith("ixi"))
    assert ixi_line.split()[1] == "6"


def test_reference_sizes_keep_ratios_with_a_minimum():
    sizes = site_sizes(["brussels", "greifswald", "prague"], 20, "reference")
    assert sizes["brussels"] == 6
    assert sizes["prague"] > 2.5 * sizes["greifswald"]
    assert site_sizes(["ixi", "camcan"], 10, "equal") == {"ixi": 10, "camcan": 10}


def test_ms_cohort_defaults_to_ms_sites():
    args = parse(["--out", "x", "--cohort", "ms"])
    from neurofed.data.synth.command import parse_sites

    assert parse_sites(args.sites, args.cohort) == ["brussels", "greifswald", "prague"]
    assert parse_sites(None, None) == ["ixi", "sald", "camcan"]


def test_unknown_site_is_a_clear_error(tmp_path, capsys):
    assert run(parse(["--out", str(tmp_path), "--sites", "ixi,oxford"])) == 2
    err = capsys.readouterr().err
    assert "oxford" in err and "known sites: ixi, sald, camcan, brussels, greifswald, prague" in err
    assert not (tmp_path / "ixi").exists()


@pytest.mark.parametrize("bad", ["--sizes=huge", "--cohort=elderly"])
def test_bad_choices_rejected(bad):
    with pytest.raises(SystemExit):
        parse(["--out", "x", bad])


def test_bad_site_effect_is_refused_before_writing(tmp_path, capsys):
    assert run(parse(["--out", str(tmp_path), "--sites", "ixi", "--site-effect", "-1"])) == 2
    assert "site_effect must be within" in capsys.readouterr().err
    assert not (tmp_path / "ixi").exists()
    assert parse(["--out", "x"]).site_effect == 1.0


def test_age_ranges_give_each_site_its_own_ages(tmp_path):
    from neurofed.data.synth import read_tsv

    rc = run(parse(["--out", str(tmp_path), "--sites", "ixi,sald", "--subjects", "8", "--resolution", "4",
                    "--sizes", "equal", "--sessions", "0", "--age-ranges", "20-30,70-80", "--no-progress"]))
    assert rc == 0
    young = [float(r["age"]) for r in read_tsv(tmp_path / "ixi" / "participants.tsv")]
    old = [float(r["age"]) for r in read_tsv(tmp_path / "sald" / "participants.tsv")]
    assert all(20 <= a <= 30 for a in young) and all(70 <= a <= 80 for a in old)


@pytest.mark.parametrize("ranges, message", [("20-30", "1 range(s) for 2 site(s)"), ("20-30,old", "not LO-HI"),
                                             ("20-30,80-70", "LO < HI")])
def test_bad_age_ranges_are_refused_before_writing(tmp_path, capsys, ranges, message):
    assert run(parse(["--out", str(tmp_path), "--sites", "ixi,sald", "--age-ranges", ranges])) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ixi").exists()
