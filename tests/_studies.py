"""The tiny digits study that end-to-end tests run in seconds."""


def tiny_study(name: str, seed: int) -> str:
    """Study-file text: 30 search / 20 report inputs, n = 200, n_p = 100, 9 trials, outputs in runs/<name>."""
    return f"""
[study]
name = "{name}"
output_dir = "runs/{name}"
seed = {seed}
[data]
search_inputs = 30
report_inputs = 20
[train]
epochs = 4
[certify]
n0 = 16
n = 200
[irs]
n_p = 100
[search]
trials = 9
"""
