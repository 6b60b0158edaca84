"""bench/decode_load.py's report: context held and each row's share of its length's best."""

from bench.decode_load import OUTPUT, report


def test_report_rows_share_of_the_best_rate():
    rows = [(1024, 1, 1.0), (1024, 4, 2.0), (2048, 1, 2.0), (2048, 2, 2.0)]
    text = report(rows, 1536)
    lines = [l for l in text.splitlines() if l.startswith("| 1024") or l.startswith("| 2048")]
    assert len(lines) == 4
    # 1024 x 4 in 2 s is the best for its length (256 tokens/s); one call alone makes half.
    assert lines[0].split("|")[3].strip() == str(1 * (1024 + OUTPUT))
    assert lines[0].rstrip(" |").endswith("0.50") and lines[1].rstrip(" |").endswith("1.00")
    assert lines[2].rstrip(" |").endswith("0.50") and lines[3].rstrip(" |").endswith("1.00")
