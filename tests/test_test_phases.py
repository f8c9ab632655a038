"""`make test`'s two phases: what starts processes or reads the clock runs alone (tests/conftest.py), the rest on
two pytest-xdist workers. A multi-process test that slipped into the parallel phase would share the two cores
with another worker's tests and could miss its timeouts; these are the kinds of code the marking must see."""

from __future__ import annotations

import test_benchmark
import test_conditional_ddp
import test_divergence_colouring
import test_eval_ddp
import test_run_stops
import test_training_timer
from conftest import is_serial_code


def test_tests_that_start_processes_or_time_things_are_marked_to_run_alone():
    # a subprocess DDP run written out in the test
    assert is_serial_code([test_eval_ddp.test_fid_and_bpd_under_ddp_equal_the_single_process_values])
    # benchmark workers through a keyword (`run_suite(..., jobs=2)`), not a command line
    assert is_serial_code([test_benchmark.test_parallel_workers_reproduce_the_suites_own_process])
    # a loader class of the test module that sleeps, asserted against the timer
    assert is_serial_code([test_training_timer.test_loop_clock_includes_fetching_and_skips_epoch_boundaries])
    # a probe started by a module fixture (the collection hook passes its function) through the helper module's `run`
    assert is_serial_code([test_conditional_ddp.ddp_runs.__wrapped__])
    from test_conditional_ddp import \
        test_conditional_family_on_two_cpu_ranks_shards_labelled_batches_and_ends_identical as reads_the_probes_files
    assert not is_serial_code([reads_the_probes_files])  # alone it starts nothing: the fixture makes it serial
    # signals to DDP ranks
    assert is_serial_code([test_run_stops.test_sigterm_to_every_rank_of_a_ddp_job_saves_once_and_every_process_exits])


def test_in_process_tests_run_on_the_workers():
    assert not is_serial_code([test_divergence_colouring.test_the_coloured_trace_equals_the_brute_force_one])
