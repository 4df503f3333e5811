"""Tuned step grids: model.yaml's strict `grids:` section, the grid a sampler is handed,
the search's parameterisation and pattern search, and writing grids back."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from engines.grid_search import GridSpace, pattern_search
from engines.grids_file import CARD_START, write_card, write_grids
from engines.noise import row_seeds
from engines.repository import GridError, Repository, RepositoryError, TunedGrid
from engines.samplers import drive
from engines.sampling import start_sampler
from engines.schedules import karras_sigmas

PACKAGE = Path(__file__).parents[2] / "model_repo" / "fashion-gaussian"
TUNED = [80.0, 3.0, 0.4, 0.0]  # 3 steps
ENTRY = {
    "sigmas": TUNED,
    "objective": "ref-mse",
    "n_search": 64,
    "n_eval": 200,
    "seed": 0,
    "fd_before": 11.3,
    "fd_after": 9.9,
    "accuracy_before": 0.81,
    "accuracy_after": 0.84,
}


@pytest.fixture
def copy(tmp_path) -> Path:
    folder = tmp_path / "repo" / "fashion-gaussian"
    shutil.copytree(PACKAGE, folder)
    return folder


def with_grids(folder: Path, grids) -> Path:
    path = folder / "model.yaml"
    data = yaml.safe_load(path.read_text())
    data["grids"] = grids
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def entry(**changes) -> dict:
    return {**ENTRY, **changes}


BAD_GRIDS = [
    ({"warp": {3: entry()}}, "unknown key grids.warp"),
    ({"dpmpp_2m": []}, "grids.dpmpp_2m must be a non-empty a mapping of step counts"),
    ({"dpmpp_2m": {"3": entry()}}, "grids.dpmpp_2m.3: the key must be a step count in 2..50"),
    ({"dpmpp_2m": {1: entry(sigmas=[80.0, 0.0])}}, "the key must be a step count in 2..50"),
    ({"dpmpp_2m": {51: entry()}}, "the key must be a step count in 2..50"),
    ({"dpmpp_2m": {4: entry()}}, "grids.dpmpp_2m.4.sigmas must be a list of 5 numbers"),
    ({"dpmpp_2m": {3: entry(sigmas=[80.0, 0.4, 3.0, 0.0])}}, "sigmas[2] must be below sigmas[1]"),
    ({"dpmpp_2m": {3: entry(sigmas=[80.0, 3.0, 3.0, 0.0])}}, "sigmas[2] must be below sigmas[1]"),
    ({"dpmpp_2m": {3: entry(sigmas=[90.0, 3.0, 0.4, 0.0])}}, "sigmas[0] must be a finite number"),
    ({"dpmpp_2m": {3: entry(sigmas=[80.0, 3.0, 0.0, 0.0])}}, "sigmas[2] must be a finite number"),
    ({"dpmpp_2m": {3: entry(sigmas=[80.0, 3.0, 0.4, -0.1])}}, "sigmas[3] must be a finite number"),
    ({"dpmpp_2m": {3: entry(sigmas=[80.0, math.nan, 0.4, 0.0])}}, "sigmas[1] must be a finite"),
    ({"dpmpp_2m": {3: entry(sigmas=[80.0, math.inf, 0.4, 0.0])}}, "sigmas[1] must be a finite"),
    ({"dpmpp_2m": {3: entry(sigmas=[80.0, "3", 0.4, 0.0])}}, "sigmas[1] must be a finite"),
    ({"dpmpp_2m": {3: entry(fd_after=-1)}}, "grids.dpmpp_2m.3.fd_after must be a finite number"),
    ({"dpmpp_2m": {3: entry(accuracy_after=1.5)}}, "accuracy_after must be a number in 0..1"),
    ({"dpmpp_2m": {3: entry(n_search=0)}}, "grids.dpmpp_2m.3.n_search must be an integer >= 1"),
    ({"dpmpp_2m": {3: {**ENTRY, "fd": 1.0}}}, "unknown key grids.dpmpp_2m.3.fd"),
    ({"dpmpp_2m": {3: {k: v for k, v in ENTRY.items() if k != "sigmas"}}}, "sigmas is missing"),
    ({"dpmpp_2m": {3: entry(orders=[1, 2])}}, "grids.dpmpp_2m.3.orders must be a list of 3 solver"),
    ({"dpmpp_2m": {3: entry(orders=[1, "2", 1])}}, "orders must be a list of 3 solver orders"),
    ({"dpmpp_2m": {3: entry(orders=[1, 2.5, 1])}}, "orders must be a list of 3 solver orders"),
    (
        {"dpmpp_2m": {3: entry(orders=[1, 3, 1])}},
        "orders[1] must be an integer in 1..2 for dpmpp_2m",
    ),
    ({"dpmpp_2m": {3: entry(orders=[1, 0, 1])}}, "orders[1] must be an integer in 1..2"),
    ({"dpmpp_2m": {3: entry(orders=[2, 2, 1])}}, "orders[0] is 2, but step 0 has only 0 earlier"),
    ({"unipc": {3: entry(orders=[1, 3, 1])}}, "orders[1] is 3, but step 1 has only 1 earlier"),
    (
        {"dpmpp_2m": {3: entry(orders=[1, 2, 2])}},
        "dpmpp_2m.3.orders: orders[2] must be 1: the last",
    ),
    ({"deis": {3: entry(orders=[1, 2, 1])}}, "grids.deis.3.orders: sampler 'deis' takes no order"),
]


@pytest.mark.parametrize(("grids", "message"), BAD_GRIDS, ids=[m for _, m in BAD_GRIDS])
def test_a_bad_grid_fails_with_the_file_and_the_key(copy, grids, message):
    path = with_grids(copy, grids)
    with pytest.raises(RepositoryError) as err:
        Repository(copy.parent)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_a_sampler_the_model_does_not_list_is_refused(copy):
    path = with_grids(copy, {"cm_multistep": {3: entry()}})
    with pytest.raises(RepositoryError, match=r"unknown key grids\.cm_multistep; the keys here"):
        Repository(copy.parent)
    assert path.is_file()


def recorded(model, sampler: str, steps: int, seeds, labels, grid="auto", orders=None):
    """Started as the worker starts it, run on `model`: every (x, sigma) the sampler asks
    the denoiser about, and its final sample."""
    gen, cond, _ = start_sampler(model, sampler, steps, seeds, labels, grid=grid, orders=orders)
    asked = []
    x, sigma = next(gen)
    try:
        while True:
            asked.append((x, sigma))
            x, sigma = gen.send(model.denoiser(x, torch.full((len(seeds),), sigma), cond))
    except StopIteration as stop:
        return asked, stop.value


def sigmas_asked(model, sampler: str, steps: int, grid="auto") -> list[float]:
    """The noise levels a sampler asks the denoiser for."""
    asked, _ = recorded(model, sampler, steps, row_seeds(0, 2), torch.tensor([0, 1]), grid)
    return [sigma for _, sigma in asked]


@pytest.fixture
def tuned(copy):
    with_grids(copy, {"dpmpp_2m": {3: entry()}, "unipc": {3: entry(sigmas=[80.0, 5.0, 0.7, 0.0])}})
    return Repository(copy.parent).load("fashion-gaussian")


ENDS_ABOVE_0 = [80.0, 3.0, 0.4, 0.02]  # 3 steps, the sample is x at sigma 0.02


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_a_tuned_grid_with_orders_and_a_positive_end_is_run_exactly_as_written(copy, sampler):
    with_grids(copy, {sampler: {3: entry(sigmas=ENDS_ABOVE_0, orders=[1, 2, 2])}})
    model = Repository(copy.parent).load("fashion-gaussian")
    grid = model.spec.grids[sampler][3]
    assert grid.orders == (1, 2, 2) and grid.sigmas == tuple(ENDS_ABOVE_0)
    assert sigmas_asked(model, sampler, 3) == ENDS_ABOVE_0[:-1]

    def sample(grid, orders=None):
        gen, cond, nfe = start_sampler(
            model, sampler, 3, row_seeds(7, 2), torch.tensor([0, 1]), grid=grid, orders=orders
        )
        return drive(gen, model.denoiser, cond), nfe

    tensor = torch.tensor(ENDS_ABOVE_0, dtype=torch.float64)
    tuned_x, nfe = sample("auto")
    assert nfe == 3 and torch.equal(tuned_x, sample(tensor, [1, 2, 2])[0])
    assert not torch.allclose(tuned_x, sample(tensor)[0])  # its own schedule: 1, 2, 1
    assert not torch.allclose(tuned_x, sample("karras")[0])


def trajectory(sampler: str, sigmas, orders=None) -> list[torch.Tensor]:
    """Every x a sampler asks the denoiser about, and its result, on a closed-form model."""
    model = Repository(PACKAGE.parent).load("fashion-gaussian")
    grid = torch.tensor(sigmas, dtype=torch.float64)
    asked, final = recorded(
        model, sampler, len(sigmas) - 1, row_seeds(3, 2), torch.tensor([2, 5]), grid, orders
    )
    return [*(x for x, _ in asked), final]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_the_order_schedule_decides_each_step_and_only_from_that_step_on(sampler):
    sigmas = [80.0, 9.0, 1.5, 0.3, 0.03]
    # the sampler's own schedule at few steps is warm-up, 2, ..., and first order at the end
    own = trajectory(sampler, sigmas)
    assert all(
        torch.equal(a, b)
        for a, b in zip(own, trajectory(sampler, sigmas, [1, 2, 2, 1]), strict=True)
    )
    base = trajectory(sampler, sigmas, [1, 2, 2, 2])
    for step in (1, 2, 3):
        changed = [1, 2, 2, 2]
        changed[step] = 1
        other = trajectory(sampler, sigmas, changed)
        # x_i is the state before step i: equal up to the changed step, different after it
        assert all(torch.equal(base[i], other[i]) for i in range(step + 1))
        assert not torch.allclose(base[step + 1], other[step + 1])


def test_first_order_everywhere_is_ddim():
    sigmas = [80.0, 9.0, 1.5, 0.3, 0.0]
    first = trajectory("dpmpp_2m", sigmas, [1, 1, 1, 1])
    euler = trajectory("euler", sigmas)
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(first, euler, strict=True)
    )


@pytest.mark.parametrize(
    ("sampler", "orders", "sigmas", "message"),
    [
        ("dpmpp_2m", [1, 2], [80.0, 1.0, 0.1, 0.0], "one order per step (3)"),
        ("dpmpp_2m", [1, 2, 2], [80.0, 1.0, 0.1, 0.0], "orders[2] must be 1: the last step"),
        ("unipc", [1, 2, 4], [80.0, 1.0, 0.1, 0.01], "orders[2] must be an integer in 1..3"),
        ("euler", [1, 1, 1], [80.0, 1.0, 0.1, 0.0], "has no option 'orders'"),
    ],
)
def test_create_refuses_a_schedule_the_sampler_cannot_run(sampler, orders, sigmas, message):
    from engines.noise import RowNoise
    from engines.samplers import SamplerError, create

    x = torch.zeros(1, 1, 2, 2)
    grid = torch.tensor(sigmas, dtype=torch.float64)
    with pytest.raises(SamplerError) as err:
        create(sampler, x, grid, RowNoise([0]), orders=orders)
    assert message in str(err.value)


def test_the_sampler_is_handed_exactly_the_tuned_sigmas(tuned):
    assert sigmas_asked(tuned, "dpmpp_2m", 3) == TUNED[:-1]
    assert sigmas_asked(tuned, "dpmpp_2m", 3, "tuned") == TUNED[:-1]
    assert sigmas_asked(tuned, "unipc", 3) == [80.0, 5.0, 0.7]
    assert tuned.spec.grid(3, "dpmpp_2m").tolist() == TUNED


def test_karras_on_request_and_for_untuned_steps_or_samplers(tuned):
    s = tuned.spec.sampling
    for sampler, steps, grid in (
        ("dpmpp_2m", 3, "karras"),
        ("dpmpp_2m", 4, "auto"),
        ("deis", 3, "auto"),
    ):
        plain = karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho).tolist()
        assert sigmas_asked(tuned, sampler, steps, grid) == plain[:-1]
        assert tuned.spec.grid_used(sampler, steps, grid) == "karras"
    assert tuned.spec.grid_used("dpmpp_2m", 3) == "tuned"


def test_a_grid_is_made_once_and_handed_out_as_a_new_tensor_each_time(tuned):
    """ModelSpec.grid remembers the values, not the tensor: what a caller does to the
    tensor it got never reaches the next caller, and the values and dtype are the ones the
    grid's own function gives."""
    spec, s = tuned.spec, tuned.spec.sampling
    for steps in (1, 2, 4, 7):
        first = spec.grid(steps, "euler")
        plain = karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho)
        assert first.dtype == plain.dtype and torch.equal(first, plain)
        first.mul_(0)  # a caller that writes into its grid
        again = spec.grid(steps, "euler")
        assert again is not first and torch.equal(again, plain)
    assert spec.grid(3, "dpmpp_2m").tolist() == TUNED  # the tuned one, remembered apart
    assert (
        spec.grid(3, "dpmpp_2m", "karras").tolist()
        == karras_sigmas(3, s.sigma_min, s.sigma_max, s.rho).tolist()
    )


def test_tuned_where_none_exists_names_the_tuned_budgets(tuned):
    with pytest.raises(GridError) as err:
        tuned.spec.grid(4, "dpmpp_2m", "tuned")
    assert "no tuned grid for sampler dpmpp_2m with 4 steps" in str(err.value)
    assert "dpmpp_2m: steps [3], unipc: steps [3]" in str(err.value)
    with pytest.raises(GridError, match="grid must be one of"):
        tuned.spec.grid(3, "dpmpp_2m", "bespoke")
    assert tuned.spec.tuned_budgets() == {"dpmpp_2m": [3], "unipc": [3]}


def test_a_tuned_grid_changes_the_samples_and_karras_reproduces_the_plain_ones(tuned, copy):
    plain = Repository(copy.parent).load("fashion-gaussian")  # same files: grids don't matter

    def sample(model, grid):
        gen, cond, nfe = start_sampler(
            model, "dpmpp_2m", 3, row_seeds(7, 2), torch.tensor([0, 1]), grid=grid
        )
        return drive(gen, model.denoiser, cond), nfe

    tuned_x, nfe = sample(tuned, "auto")
    karras_x, _ = sample(tuned, "karras")
    explicit, _ = sample(plain, torch.tensor(TUNED, dtype=torch.float64))
    assert nfe == 3 and torch.equal(tuned_x, explicit)
    assert not torch.allclose(tuned_x, karras_x)


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_grid_space_points_are_valid_grids_and_round_trip(steps):
    space = GridSpace(steps, 80.0, 0.002)
    g = torch.Generator().manual_seed(steps)
    for _ in range(50):
        z = (torch.randn(space.dims, generator=g) * 3).tolist()
        sigmas = space.sigmas(z)
        assert len(sigmas) == steps + 1 and sigmas[0] == 80.0 and sigmas[-1] == 0.0
        assert bool((sigmas[1:] < sigmas[:-1]).all()) and float(sigmas[-2]) > 0.002
        moderate = space.sigmas([v / 3 for v in z])  # increments well above MIN_WEIGHT
        assert space.sigmas(space.point(moderate)).tolist() == pytest.approx(moderate.tolist())
    karras = karras_sigmas(steps, 0.002, 80.0, 7.0)
    again = space.sigmas(space.point(karras))
    assert again[:-2].tolist() == pytest.approx(karras[:-2].tolist(), rel=1e-3)
    assert float(again[-2]) == pytest.approx(0.002, rel=0.01)


@pytest.mark.parametrize("steps", [2, 4])
def test_a_free_end_space_ends_above_its_floor_and_round_trips(steps):
    space = GridSpace(steps, 80.0, 0.001, free_end=True, max_order=2)
    assert space.dims == steps
    g = torch.Generator().manual_seed(steps)
    for _ in range(50):
        z = (torch.randn(space.dims, generator=g) * 3).tolist()
        sigmas = space.sigmas(z)
        assert len(sigmas) == steps + 1 and sigmas[0] == 80.0 and float(sigmas[-1]) > 0.001
        assert bool((sigmas[1:] < sigmas[:-1]).all())
        moderate = space.sigmas([v / 3 for v in z])
        assert space.sigmas(space.point(moderate)).tolist() == pytest.approx(moderate.tolist())
    assert space.plain_orders() == [1, *[2] * (steps - 1)]
    # a grid ending at 0 is taken as one ending at the floor
    assert float(space.sigmas(space.point(karras_sigmas(steps, 0.002, 80.0, 7.0)))[-1]) == (
        pytest.approx(0.001, rel=0.01)
    )


def test_order_moves_keep_the_first_step_first_order_and_the_step_into_0_too():
    free = GridSpace(3, 80.0, 0.001, free_end=True, max_order=3)
    assert free.order_moves([1, 2, 2]) == [[1, 1, 2], [1, 2, 1], [1, 2, 3]]
    zero = GridSpace(3, 80.0, 0.002, max_order=2)
    assert zero.plain_orders() == [1, 2, 1]
    assert zero.order_moves([1, 2, 1]) == [[1, 1, 1]]
    assert GridSpace(3, 80.0, 0.002).plain_orders() is None


def test_pattern_search_over_orders_finds_the_best_schedule_with_the_grid():
    space = GridSpace(3, 80.0, 0.001, free_end=True, max_order=2)
    target = torch.tensor([80.0, 4.0, 0.3, 0.01], dtype=torch.float64).log()

    def objective(sigmas, orders):
        wrong = sum(a != b for a, b in zip(orders, [1, 1, 2], strict=True))
        return float((sigmas.log() - target).square().sum()) + wrong

    start = karras_sigmas(3, 0.002, 80.0, 7.0)
    result = pattern_search(space, objective, [start], max_evals=400, min_step=1e-3, log=str)
    assert result.best.orders == [1, 1, 2] and result.best.value < 1e-4
    assert result.start.orders == [1, 2, 1]  # a plain start ending at 0: first order into 0
    assert result.stopped == "converged"


def test_pattern_search_finds_a_known_grid_and_never_ends_worse_than_its_start():
    space = GridSpace(3, 80.0, 0.002)
    target = torch.tensor([80.0, 4.0, 0.3, 0.0], dtype=torch.float64)

    def objective(sigmas, orders):
        assert orders is None  # a space without orders leaves the sampler its own
        return float((sigmas[1:-1].log() - target[1:-1].log()).square().sum())

    start = karras_sigmas(3, 0.002, 80.0, 7.0)
    result = pattern_search(space, objective, [start], max_evals=200, min_step=1e-3, log=str)
    assert result.best.value <= result.start.value
    assert result.stopped == "converged" and result.best.value < 1e-4
    capped = pattern_search(space, objective, [start], max_evals=5, log=str)
    assert len(capped.trials) == 5 and capped.stopped == "evaluations"
    assert capped.best.value <= capped.start.value


def grid(**changes) -> TunedGrid:
    values = {**ENTRY, "sigmas": tuple(ENTRY["sigmas"]), **changes}
    return TunedGrid(**values)


def test_write_grids_merges_keeps_every_other_line_and_loads(copy):
    path = copy / "model.yaml"
    before = path.read_text()
    write_grids(path, "fashion-gaussian", {("dpmpp_2m", 3): grid()})
    write_grids(path, "fashion-gaussian", {("unipc", 2): grid(sigmas=(80.0, 1.0, 0.0))})
    write_grids(path, "fashion-gaussian", {("dpmpp_2m", 3): grid(fd_after=9.0)})
    text = path.read_text()
    assert text.startswith(before) and text.count("grids:") == 1
    spec = Repository(copy.parent).spec("fashion-gaussian")
    assert spec.tuned_budgets() == {"dpmpp_2m": [3], "unipc": [2]}
    assert spec.grids["dpmpp_2m"][3].fd_after == 9.0
    assert spec.grids["unipc"][2].sigmas == (80.0, 1.0, 0.0)
    assert spec.grids["unipc"][2].orders is None and "orders" not in text
    with_orders = grid(sigmas=(80.0, 3.0, 0.4, 0.01), orders=(1, 2, 2))
    write_grids(path, "fashion-gaussian", {("dpmpp_2m", 3): with_orders})
    assert Repository(copy.parent).spec("fashion-gaussian").grids["dpmpp_2m"][3] == with_orders


def test_write_grids_refuses_a_grid_that_would_not_load(copy):
    path = copy / "model.yaml"
    before = path.read_text()
    with pytest.raises(RepositoryError, match="sigmas\\[1\\] must be a finite number"):
        write_grids(path, "fashion-gaussian", {("dpmpp_2m", 2): grid(sigmas=(80.0, 0.0, 0.0))})
    assert path.read_text() == before and not list(copy.glob("*.tmp"))


def test_write_card_adds_then_replaces_its_section(copy):
    card = copy / "1" / "MODEL_CARD.md"
    original = card.read_text()
    args = type(
        "Args",
        (),
        {
            "model": "fashion-gaussian",
            "nfe": "3",
            "samplers": "dpmpp_2m",
            "objective": "auto",
            "n_search": 64,
            "n_eval": 200,
            "ref_steps": 16,
            "max_evals": 6,
            "max_minutes": 3.0,
            "seed": 0,
        },
    )()
    write_grids(copy / "model.yaml", "fashion-gaussian", {("dpmpp_2m", 3): grid()})
    write_card(card, {("dpmpp_2m", 3): grid()}, args)
    write_card(card, {("dpmpp_2m", 3): grid()}, args)
    text = card.read_text()
    assert text.startswith(original.rstrip("\n")) and text.count(CARD_START) == 1
    assert (
        "| dpmpp_2m | 3 | 200 | 11.300 | 9.900 | 0.810 | 0.840 | ref-mse (n=64) | 80, 3, 0.4, 0 "
        "| default |" in text
    )
    assert text.count("- `fewstep tune fashion-gaussian --nfe 3 --samplers dpmpp_2m") == 1
    args.nfe = "4"
    write_card(card, {("dpmpp_2m", 3): grid()}, args)
    text = card.read_text()
    first, second = text.index("--nfe 3 --samplers"), text.index("--nfe 4 --samplers")
    assert first < second and text.count(CARD_START) == 1
