"""Tests of scripts/bench.py that need no server: the report merge, wrk parsing, and that every
section renders the JSON a real run saved (scripts/testdata/bench/SECTION.json, small runs).

    python3 -m unittest discover -s scripts -p 'test_bench.py'     # scripts/test.sh runs it
"""

import json
import unittest
from pathlib import Path

import bench

TESTDATA = Path(__file__).resolve().parent / "testdata" / "bench"


class MergeReport(unittest.TestCase):
    OLD = (
        "# Benchmarks\n\nold header\n\n"
        "## A\n\nold numbers of A\n\n" + bench.END_MARK + "\n\nRead (hand-written): A was slow.\n\n"
        "## Hand-written\n\nkept as it is\n\n"
        "## B\n\nold numbers of B, no mark\n\n"
    )

    def test_a_rendered_section_replaces_its_numbers_and_keeps_the_notes_below_the_mark(self):
        new_a = "## A\n\nnew numbers of A\n\n" + bench.END_MARK + "\n\n"
        out = bench.merge_report(self.OLD, [new_a], "# Benchmarks\n\nnew header\n\n")
        self.assertNotIn("old numbers of A", out)
        self.assertNotIn("old header", out)
        self.assertIn("new header", out)
        self.assertIn("new numbers of A\n\n" + bench.END_MARK + "\n\nRead (hand-written): A was slow.", out)
        self.assertEqual(out.count(bench.END_MARK), 1)
        # The other sections stay, in their order.
        self.assertLess(out.index("## A"), out.index("## Hand-written"))
        self.assertLess(out.index("## Hand-written"), out.index("## B"))
        self.assertIn("old numbers of B, no mark", out)

    def test_a_section_without_a_mark_is_replaced_whole_and_a_new_one_is_appended(self):
        new_b = "## B\n\nnew B\n\n" + bench.END_MARK + "\n\n"
        new_c = "## C\n\nnew C\n\n" + bench.END_MARK + "\n\n"
        out = bench.merge_report(self.OLD, [new_b, new_c], "# H\n\n")
        self.assertNotIn("old numbers of B", out)
        self.assertTrue(out.endswith("new C\n\n" + bench.END_MARK + "\n\n"))
        self.assertIn("Read (hand-written): A was slow.", out)

    def test_rendering_again_keeps_the_notes_once(self):
        new_a = "## A\n\nnew numbers of A\n\n" + bench.END_MARK + "\n\n"
        once = bench.merge_report(self.OLD, [new_a], "# H\n\n")
        twice = bench.merge_report(once, [new_a], "# H\n\n")
        self.assertEqual(once, twice)


class Wrk(unittest.TestCase):
    def test_latencies_in_every_unit_wrk_prints(self):
        self.assertAlmostEqual(bench.latency_ms("812.00us"), 0.812)
        self.assertAlmostEqual(bench.latency_ms("3.21ms"), 3.21)
        self.assertAlmostEqual(bench.latency_ms("1.02s"), 1020.0)
        self.assertAlmostEqual(bench.latency_ms("1.50m"), 90000.0)
        self.assertIsNone(bench.latency_ms("n/a"))


class Render(unittest.TestCase):
    def test_every_section_renders_a_saved_run(self):
        for name in bench.SECTIONS:
            with self.subTest(section=name):
                result = json.loads((TESTDATA / f"{name}.json").read_text())
                text = bench.render(result)
                self.assertTrue(text.startswith("## "), text[:80])
                self.assertTrue(text.rstrip().endswith(bench.END_MARK))
                self.assertNotIn("None", text)
                self.assertIn(result["machine"]["commit"], text)


if __name__ == "__main__":
    unittest.main()
