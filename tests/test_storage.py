"""The study storage: retries of dead trials, dead workers on this host, driver hints."""

import subprocess
import sys
import warnings

import optuna
import pytest

from approxtune import storage
from approxtune.locking import this_process
from approxtune.search import DIRECTIONS
from approxtune.trials import RESULT_ATTR


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_retry_of_a_dead_trial_inherits_its_parameters_and_baseline_but_nothing_of_its_result(tmp_path):
    """Optuna's retry copied the dead trial's system attributes: its constraint values (so Optuna ignored the retry's
    own, warning "The constraint value is ignored because this constraint ... is already set") and its result."""
    backend = storage.storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=backend, directions=list(DIRECTIONS))
    study.enqueue_trial({"fc.precision": "int8"}, user_attrs={"baseline": "int8"})
    dead = study.ask()
    dead.suggest_categorical("fc.precision", ["fp32", "int8"])
    dead.set_user_attr("worker", "elsewhere:1")
    dead.set_user_attr("acr", 0.5)
    backend.set_trial_system_attr(dead._trial_id, RESULT_ATTR, '{"acr": 0.5}')
    dead.set_constraint("accuracy_drop", 0.25)
    backend.set_trial_state_values(dead._trial_id, state=optuna.trial.TrialState.FAIL)  # its worker died
    backend.get_heartbeat_stale_trial_callback()(study, backend.get_trial(dead._trial_id))

    (retry,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert retry.params == {"fc.precision": "int8"} and retry.user_attrs == {"baseline": "int8"}
    assert retry.system_attrs["failed_trial"] == dead.number and retry.system_attrs["retry_history"] == [dead.number]
    assert RESULT_ATTR not in retry.system_attrs
    assert not [key for key in retry.system_attrs if key.startswith("constraints")]
    assert backend.get_trial(dead._trial_id).system_attrs[RESULT_ATTR] == '{"acr": 0.5}', "the dead one keeps"

    trial = study.ask()
    assert trial.number == retry.number and trial.suggest_categorical("fc.precision", ["fp32", "int8"]) == "int8"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The constraint value is ignored ..." would raise
        trial.set_constraint("accuracy_drop", -0.1)
    study.tell(trial, (0.4, 0.9, 100))
    assert study.trials[retry.number].constraints == {"accuracy_drop": -0.1}


def test_a_mysql_url_without_its_driver_gets_the_mysql_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "MySQLdb", None)  # SQLAlchemy's default MySQL driver, made missing
    with pytest.raises(ValueError, match=r"needs a database driver .*; for MySQL: pip install pymysql and use a "):
        storage.storage("mysql://u:secret@127.0.0.1/db")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_only_trials_whose_worker_on_this_host_is_gone_are_failed_and_retried(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = this_process().rpartition(":")[0]
    study = optuna.create_study(storage=storage.storage(f"sqlite:///{tmp_path / 's.db'}"), directions=list(DIRECTIONS))
    workers = {"gone": f"{host}:{dead.pid}", "alive": this_process(), "elsewhere": f"not-{host}:{dead.pid}"}
    trials = {}
    for name, worker in workers.items():
        trials[name] = study.ask()
        trials[name].suggest_categorical("fc.precision", ["fp32", "int8"])
        trials[name].set_user_attr("worker", worker)

    assert storage.fail_dead_local_trials(study) == [trials["gone"].number]
    states = {name: study.trials[t.number].state for name, t in trials.items()}
    running = optuna.trial.TrialState.RUNNING
    assert states == {"gone": optuna.trial.TrialState.FAIL, "alive": running, "elsewhere": running}
    assert storage.pending_retries(study) == 1
    assert storage.fail_dead_local_trials(study) == [], "a failed trial is failed once"
