"""Unit tests of model/pipeline.py's pure parts: `model/run.sh test`
(scripts/test.sh runs it). The window truth and the debounce must agree
with the scenario runner (hil-tests/src/evaluation.rs) and the agent
(detect.raise_after / clear_after): the same cases as there."""

import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline as p  # noqa: E402


class Normalisation(unittest.TestCase):
    def test_a_spread_is_floored_at_one_step_of_its_sensor_not_at_its_own_size(self):
        # A setpoint written as 8 or 9 every tenth poll: its band energy is
        # the same in every training window (the poll schedule sets it).
        names = ["value_band1_rms{limit}", "value_last{limit}", "value_max{limit}", "value_min{limit}",
                 "value_std{temp}", "value_last{temp}", "value_slope_per_s{temp}", "value_mean{temp}"]
        n = 200
        rng = np.random.default_rng(0)
        temp = 49.0 + 0.03 * rng.standard_normal(n)
        raw = np.stack([np.full(n, 0.1918), np.where(np.arange(n) % 2 == 0, 8.0, 9.0), np.full(n, 9.0),
                        np.full(n, 8.0), 0.03 + 0.003 * rng.standard_normal(n), temp,
                        0.001 * rng.standard_normal(n), temp], axis=1)
        f = {x["name"]: x for x in p.fit_normalisation(names, raw, window_s=5.0)}
        # The setpoint reads in steps of 1: its band energy's std is at least 1.
        self.assertEqual(f["value_band1_rms{limit}"]["std"], 1.0)
        # The temperature's std (noise 0.03) is not flattened by its level
        # (49 degC): a stuck sensor (std 0) stays ten deviations away.
        self.assertLess(f["value_std{temp}"]["std"], 0.004)
        z = p.normalise(np.array([[0.1918, 8, 9, 8, 0.0, 49.0, 0.0, 49.0]]), list(f[nm] for nm in names))[0]
        self.assertLess(z[4], -5.0)
        # A level keeps its own rule: 1e-3 of its size at least.
        self.assertGreaterEqual(f["value_mean{temp}"]["std"], 0.049)

    def test_signed_and_tiny_values_keep_their_sign_and_spread(self):
        for centre in (1e-5, -1e-5, 1e5, -1e5, -0.3):
            xs = centre + abs(centre) * 0.05 * np.sin(np.arange(300) * 0.7)
            f = p.fit_normalisation(["value_mean{x}"], xs.reshape(-1, 1))[0]
            z = p.normalise(np.array([[centre + 3 * xs.std()]]), [f])[0, 0]
            self.assertAlmostEqual(float(z), 3.0, delta=0.05)


class Evaluation(unittest.TestCase):
    def test_window_truth_as_the_scenario_runner(self):
        labels = [(10_500, 30_000, "bearing_wear", 50_000), (60_000, 70_000, "cavitation", 70_000)]
        got = p.window_truth([10_000, 20_000, 15_500, 15_499, 11_000, 40_000, 60_000, 70_000, 80_000], 10_000, labels)
        self.assertEqual(got, ["", "bearing_wear", "bearing_wear", None, None, None, "", "cavitation", ""])

    def test_debounce_and_rates(self):
        above = [False, True, True, True, False, False, False, True, False]
        self.assertEqual(list(p.debounced(above, 2, 3)), [False, False, True, True, True, True, False, False, False])
        c = p.confusion([True, True, False, False, True], ["a", "", "a", "", None])
        self.assertEqual((c["tp"], c["fp"], c["fn"], c["tn"]), (1, 1, 1, 1))
        self.assertEqual((c["far"], c["mar"], c["f1"]), (0.5, 0.5, 0.5))

    def test_a_held_state_after_a_fault_counts_neither_way_up_to_its_hold(self):
        # As hil-tests/src/evaluation.rs's test of the same name.
        truth = ["", "", "s", "s", "", "", "", "", "", ""]
        state = [False, False, True, True, True, True, True, False, True, False]
        counts = lambda c: (c["tp"], c["fp"], c["fn"], c["tn"])
        self.assertEqual(counts(p.confusion(state, truth)), (2, 4, 0, 4))
        self.assertEqual(counts(p.confusion(state, truth, hold=2)), (2, 2, 0, 4))
        self.assertEqual(counts(p.confusion(state, truth, hold=3)), (2, 1, 0, 4))

    def test_history_stacks_oldest_first(self):
        z = np.arange(8, dtype=np.float32).reshape(4, 2)
        self.assertEqual(p.stacked(z, 3).tolist(), [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]])
        self.assertIs(p.stacked(z, 1), z)


if __name__ == "__main__":
    unittest.main()
