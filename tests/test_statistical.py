"""Statistical behaviour of the cross-validated estimators on teacher data with fixed seeds.

Claims (issue "honest statistical tests"):

1. CV chooses stronger tying on CNN-made data than on region-made data.
2. On region-made data CV never chooses the strongest tying.
3. ``selection='1se'`` never chooses weaker tying than ``'min'``.
4. A ``tying_graph='grid'``, ``tying_penalty='l1'`` fit recovers the region boundary (its
   kernels' two groups agree with the true halves on >= 90% of the interior positions).

Data design (one design for both teachers, nothing tuned on the outcome)
------------------------------------------------------------------------
* 8x8 images, one teacher channel, 3x3 kernels, ``kernel_scale=2`` (each
  pre-activation has standard deviation about 2, so ``tanh`` saturates and the
  teacher is not a near-linear map that any student fits equally well), and
  ``readout='sum'`` (one read-out weight shared by every position, i.e. global
  sum pooling), so that the student's cost is dominated by estimating the
  kernels, not a 64-weight dense read-out. Noise-to-signal ratio 0.3
  (best attainable R^2 about 0.92).
* Student: ``channels=1``, ``support=3`` (the teacher's kernel size), 2x2
  average pooling and a linear read-out of the 16 pooled units. The student
  with tied kernels can represent the CNN teacher exactly (uniform read-out
  weights), with 10 conv parameters; untied it has 64x as many conv parameters
  to estimate from 200 training images per fold, so on CNN data strong tying
  should win (claim 1, CNN side).
* Region teacher: the two halves use independently drawn kernels (nearly
  orthogonal in 9 dimensions). With ONE student channel, a tied student has a
  single kernel and cannot fit both halves (a student with two channels could,
  by giving each channel read-out weights on one half only; that is why the
  student has exactly as many channels as the teacher), so the strongest tying
  should be wrong (claim 2).

What was measured offline (5 seeds, 3-fold CV, tyings 10, 1, 0.1, 0.01, 1e-3, 0,
``tying_graph='mean'``) -- see the report that accompanies this file:

    seed  CNN: 'min'  regions: 'min'  (both: '1se' = 'min')
    0     1           10
    1     10          10
    2     10          10
    3     10          10
    4     10          10

So claims 1 and 2 did NOT hold in this design: on region data CV chose the
strongest tying on all 5 seeds, so "stronger on CNN data" fails on all 5 too
(equal on seeds 1-4; on seed 0 the CNN data got the weaker choice, 1 < 10).
Two causes were diagnosed:

* Optimisation: the one-channel student has spurious local minima (small
  kernel, tanh in its linear range, read-out weights of mixed signs; held-out
  R^2 about 0.45-0.6 instead of 0.9) reached from about one initialisation in
  four; a bad first (strongest-tying) fit is then warm-started along the whole
  path of that fold, so the CV curve reflects the optimiser, not the data.
* Statistics: the ``'mean'`` tying penalty shrinks every position to ONE
  common kernel; it has no notion of two regions, so at any strength weaker
  than "CNN" each of the 64 positions pays for its own noisy deviation, and a
  misspecified single kernel still predicts better (mean CV R^2 0.62-0.86
  at tying 10, higher than at every weaker tying on every seed).

Claims 1 and 2 were therefore not tested in this design; they stayed open
work, not weakened until they passed (see the third study below for the
design in which they hold and are tested). Claim 3 holds by construction of
the rule and is tested both on random score tables and on the fitted CV objects.

Follow-up study: ``tying_graph='grid'`` (design fixed before any result)
------------------------------------------------------------------------
Same data and student as above (``DATA``; ``channels=1``, ``support=3``, 2x2
average pooling, ``max_iter=200``, ``cv=3``, ``random_state=seed``), seeds 0-4,
both teachers; only the tying graph/penalty changed. Rationale: the ``'grid'``
penalty charges differences between 4-neighbour positions, so on region data
a student with two half-image kernels pays only along the 8-row boundary
(and the 4-column halves coincide with the 2x2 pooling cells), which the
``'mean'`` penalty could not express.

(a) ``tying_penalty='l2'`` (Laplacian smoothing), tyings 10, 1, 0.1, 0.01,
1e-3, 0; chosen tying with ``'min'`` (``'1se'`` in brackets) and mean CV R^2
along the path (tying 10 ... 0):

    seed  CNN        regions    CNN > regions?  regions < 10?   CNN R^2 path / regions R^2 path
    0     1  (1)     1  (10)    no (equal)      yes             .55 .67 .58 .38 .49 .58 / .70 .73 .71 .64 .68 .62
    1     10 (10)    10 (10)    no (equal)      no              .48 .35 .14 -.08 .11 .23 / .74 .72 .63 .58 .66 .59
    2     10 (10)    1  (10)    yes             yes             .91 .90 .77 .71 .78 .73 / .83 .83 .82 .78 .71 .74
    3     1  (10)    10 (10)    no (1 < 10)     no              .76 .77 .73 .69 .63 .53 / .66 .55 .42 .29 .29 .50
    4     10 (10)    10 (10)    no (equal)      no              .88 .88 .81 .68 .73 .78 / .86 .86 .71 .65 .73 .74

"Stronger tying on CNN data" holds on 1/5 seeds; "never the strongest tying
on region data" on 2/5 with ``'min'`` (0/5 with ``'1se'``). Both FAIL. The
paths are not monotone and often jump between neighbouring strengths (CNN
seed 1: R^2 0.35 at tying 1, -0.08 at 0.01, 0.23 at 0), and every mean CV R^2
is well below the ~0.92 attainable: the one-channel optimisation problem
diagnosed above (spurious minima, warm-started along each fold's path)
still decides the curves, so changing the penalty graph alone does not
rescue claims 1 and 2.

(b) ``tying_penalty='l1'`` (fused lasso / TV, FISTA), region data only,
strength chosen by 3-fold CV among 0.1, 0.01, 1e-3 (``'min'``, refit on all
300 images). "Tied groups": the effective kernel vectors (bias included,
``network_.soft_layers[0].kernels()``) of the 36 INTERIOR positions (rows
and columns 1-6 of the 8x8 output, the positions where all 9 offsets exist;
border positions lack offsets, so their vectors are not comparable) are
clustered into 2 groups by k-means (``n_init=10``, ``random_state=0``);
agreement = fraction of the 36 positions whose group matches
``info.regions``, up to label swap. Also reported: the number of connected
components of exactly tied interior neighbours (max abs difference
<= 1e-6 x the largest entry).

    seed  CV tying  CV R^2 (0.1, 0.01, 1e-3)  agreement  exact-tie components
    0     0.01      .69 .75 .68               0.53       35
    1     0.1       .75 .64 .58               0.50 *     1
    2     1e-3      .82 .82 .82               0.58       32
    3     0.1       .53 .41 .39               0.97       32
    4     0.1       .76 .65 .59               0.72       19

    * all 36 interior kernels fused into ONE kernel, so there are no two
      groups (k-means on identical vectors returned a meaningless 0.64; the
      honest value is 0.5).

Agreement >= 90% holds on 1/5 seeds: FAILS. A convergence check (decided
before looking at it, not used for the claim): fixed tying 0.01,
``max_iter=1000``, 200 training / 100 held-out images: agreement 0.50, 0.81,
0.58, 0.89, 0.69 and held-out R^2 0.53, 0.46, 0.80, 0.44, 0.67 on seeds 0-4;
FISTA still stopped at 1000 iterations on 4 of 5 seeds. The students do not
reach the teacher's accuracy, so their kernels are not estimates of the two
teacher kernels and the fused-lasso partition cannot be expected to find
the halves; on seed 2 the fit fused the interior into only 3 components
that do not follow the boundary (agreement 0.58).

No test was added for (a) or (b): neither claim holds on 4 of 5 seeds.
Both are open work, like claims 1 and 2, and blocked by the same one-channel
optimisation problem (several initialisations, or no warm start along the
path, would be the next thing to try).

Third study: several initialisations and more data (design fixed before any result)
-------------------------------------------------------------------------------------
``n_init`` (new: each cold fit starts from several initial weights and keeps the
lowest training objective) removes the optimisation cause: at tying 10 on CNN data
one initialisation reached held-out R^2 0.49 and the best of five 0.89. Everything
else as in (a) above (``DATA``, the one-channel student, tyings 10 ... 0, 3-fold CV,
``random_state=seed``), with ``n_init=5``:

    n=300, 'mean':  CNN 'min' 10 on 5/5 seeds; regions 'min' 10 on 5/5 seeds -> claims 1, 2 fail
    n=300, 'grid':  CNN 'min' 10 on 4/5 (1 on seed 3); regions 'min' 10 on 4/5 (1 on seed 0) -> fail
    n=1000, 'grid' (``DATA_LARGE``), chosen tying 'min' ('1se') and mean CV R^2 (tying 10 ... 0):

    seed  CNN          regions        CNN R^2 path / regions R^2 path
    0     10 (10)      0.1  (0.1)     .91 .91 .91 .90 .79 .61 / .75 .76 .79 .75 .59 .43
    1     10 (10)      0.01 (0.01)    .91 .91 .90 .85 .64 .42 / .66 .66 .67 .77 .73 .43
    2     10 (10)      1    (10)      .91 .91 .85 .75 .67 .61 / .84 .85 .80 .69 .55 .46
    3     10 (10)      1    (1)       .92 .92 .90 .80 .66 .57 / .65 .73 .72 .51 .30 .12
    4     10 (10)      0.01 (0.01)    .91 .91 .90 .87 .74 .52 / .69 .71 .74 .80 .72 .52

With 'min', claims 1 and 2 hold on 5/5 seeds (CNN data: the strongest tying, the
CV R^2 of a tied student near the attainable 0.92; region data: a weaker tying
every time, by a factor 10 to 1000). So the single-kernel student's
misspecification costs more than estimating position-wise kernels once each fold
has ~670 images, and the neighbour ('grid') penalty lets the student pay only
near the boundary. With '1se', region data got the strongest tying on seed 2
(the rule prefers strong tying within one SE by design). Tested below on seed 0
(``test_cv_ties_cnn_data_more_strongly_than_region_data``), with 'min'.

Re-run after two solver changes (same design, nothing else changed): L-BFGS now also
stops when the objective stalls (``tol``, ``n_iter_no_change``, as ``MLPClassifier``), and
each fold's path starts from its CNN limit (deviations frozen at zero) instead of a cold
fit at the strongest tying. Chosen tying 'min' ('1se') and mean CV R^2 (tying 10 ... 0),
2-5 s per CV fit instead of minutes:

    seed  CNN          regions        CNN R^2 path / regions R^2 path
    0     1  (10)      0.1  (0.1)     .91 .91 .91 .90 .87 .82 / .75 .76 .79 .77 .69 .60
    1     10 (10)      0.1  (10)      .91 .91 .90 .86 .78 .73 / .65 .65 .68 .67 .61 .51
    2     10 (10)      1    (10)      .91 .91 .89 .82 .75 .71 / .84 .85 .82 .74 .66 .65
    3     10 (10)      1    (1)       .92 .92 .90 .84 .74 .68 / .65 .74 .73 .59 .39 .37
    4     10 (10)      0.01 (0.1)     .91 .91 .91 .89 .83 .77 / .69 .70 .73 .73 .68 .61

Claims 1 and 2 still hold on 5/5 seeds with 'min'. On seed 0, the tested one, CNN data got
tying 1, not 10: its R^2 is flat at .91 from 10 to 0.1. The margin of claim 1 there is
exactly the one grid step the test requires (1 vs 0.1).

The boundary-recovery claim ('grid', 'l1' fit, >= 90% agreement) was re-run in
this design (``n_init=3``, tying chosen on a 700/300 split among 0.1, 0.01, 1e-3):
seed 0 chose 0.01 and reached agreement 0.75 (FISTA at max_iter=300). It still
FAILED then.

Fourth study: boundary recovery (claim 4)
-----------------------------------------
Diagnosis. The data are not the obstacle; the optimiser is. Started from the
teacher's own weights, the same student (tying 0.01, 700/300 split) reaches a
LOWER training objective than every cold fit on all 5 seeds (seed 0: 0.0125 vs
0.0192; seed 3: 0.026 vs 0.048), with agreement 1.00 on every seed. Random
starts rarely get there: of 8 smooth L-BFGS starts per seed almost all stopped
above it, with agreement 0.53-1.00 and held-out R^2 -0.1 to 0.85 (a tiny kernel
with tanh in its linear range is one trap). The valley is ill-conditioned: with
``tol=1e-10`` fits keep descending for 2000-5000 iterations, and FISTA does the
same, so "FISTA at max_iter" is the problem's conditioning, not a solver bug.
Also, the spread of y varies 80-fold over seeds 0-4, so one tying meant very
different things relative to the data term.

Design (``_boundary_fit``). ``DATA_LARGE``, teacher 'regions'; y standardised
(tying in units of var(y)); first 700 images train, last 300 held out. Stage 1:
the smooth 'grid'/'l2' fit at tying 0.1 with ``n_init=10`` (the best of 10
starts, cheap with L-BFGS). Stage 2, the fit the claim is about: the 'grid'/'l1'
fit at the same tying, FISTA, warm-started from stage 1, ``max_iter=500``.
Measure: as in study (b) above (k-means on the 36 interior kernel vectors, 0.5
if all fused into one). Not fixed blind: before it, the same pipeline was run
with ``kernel_scale=1``; tying 0.1 and 10 starts were chosen after seeing all 5
seeds (not the test seed alone). Results (held-out R^2; 0.92 attainable):

    seed  agreement  R^2   (FISTA 500 iterations, at max_iter on every seed)
    0     1.00       .87
    1     0.97       .82
    2     1.00       .86
    3     1.00       .76
    4     1.00       .77

Checks run afterwards: tying 0.03 gives agreement 1.00 .92 1.00 1.00 .97 (5/5),
tying 0.3 .86 .97 1.00 .92 1.00 (4/5); FISTA run to 2000 iterations at 0.1 gives
1.00 .97 1.00 1.00 1.00. Tested on seed 0 with agreement >= 0.9 and held-out
R^2 >= 0.7 (a guard against a spurious basin; 12 s).

What this does NOT show. The smooth stage already finds the halves (agreement
1.00 .97 1.00 1.00 1.00 before the l1 stage); the l1 stage keeps them. Exact
fusion does not happen: the fused lasso leaves the interior in 8-36 exactly tied
pieces, so "connected components of exactly fused neighbours match the halves"
FAILS on every seed (agreement 0.03-0.25 by that measure). The effect of
standardising y and of 10 starts was not separated.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from softcnn import SoftConvRegressor, SoftConvRegressorCV
from softcnn.cv import select_strengths
from softcnn.datasets import make_soft_conv_data

TYINGS = [10.0, 1.0, 0.1, 0.01, 1e-3, 0.0]
SEED = 0  # fixed before any result was seen; not chosen to make a test pass

DATA = dict(n_samples=300, image_shape=(8, 8), n_channels=1, kernel_size=3, noise=0.3,
            kernel_scale=2.0, readout="sum")
DATA_LARGE = {**DATA, "n_samples": 1000}
STUDENT = dict(channels=1, kernel_size=3, support=3, pooling="avg", tyings=TYINGS, cv=3,
               max_iter=200, refit=False)



@pytest.fixture(scope="module")
def fitted():
    """3-fold CV of the same student on CNN-made and on region-made data (seed SEED)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for teacher in ("cnn", "regions"):
            X, y, _ = make_soft_conv_data(teacher=teacher, random_state=SEED, **DATA)
            out[teacher] = SoftConvRegressorCV(selection="1se", random_state=SEED,
                                               **STUDENT).fit(X, y)
    return out


# ------------------------------------------------------------------ claim 3
def test_one_se_never_weaker_than_min_on_random_score_tables():
    """The rule itself: for any score table, '1se' ties at least as strongly as 'min'."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_loc, n_ty, n_folds = rng.integers(1, 4), rng.integers(1, 8), rng.integers(2, 6)
        tyings = np.sort(rng.choice([0.0, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0], n_ty,
                                    replace=False))[::-1]
        localities = np.sort(rng.uniform(0, 5, n_loc))[::-1]
        scores = rng.normal(size=(n_loc, n_ty, n_folds))
        if rng.random() < 0.3:  # exact ties between grid points
            scores[:, rng.integers(n_ty)] = scores[:, 0]
        i_min = select_strengths(scores, tyings, localities, "min")
        i_1se = select_strengths(scores, tyings, localities, "1se")
        assert tyings[i_1se[1]] >= tyings[i_min[1]]
        # and the '1se' choice is within one standard error of the best mean
        mean = scores.mean(axis=2)
        se = scores[i_min].std(ddof=1) / np.sqrt(n_folds)
        assert mean[i_1se] >= mean[i_min] - se - 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["cnn", "regions"])
def test_one_se_never_weaker_than_min_on_teacher_data(fitted, teacher):
    cv = fitted[teacher]
    t_min = cv.tyings_[cv.index_min_[1]]
    t_1se = cv.tyings_[cv.index_1se_[1]]
    assert cv.tying_ == t_1se  # selection='1se' reports the 1se choice
    assert t_1se >= t_min


# --------------------------------------------------------------- claims 1, 2
@pytest.mark.slow
def test_cv_ties_cnn_data_more_strongly_than_region_data():
    """Third study's design (n=1000, 'grid' tying, n_init=5), seed SEED, rule 'min'.

    Claim 1: the tying chosen on CNN data is stronger than on region data, by at
    least one grid step (x10). Claim 2: on region data it is not the strongest.
    """
    chosen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for teacher in ("cnn", "regions"):
            X, y, _ = make_soft_conv_data(teacher=teacher, random_state=SEED, **DATA_LARGE)
            cv = SoftConvRegressorCV(n_init=5, tying_graph="grid", random_state=SEED, **STUDENT).fit(X, y)
            chosen[teacher] = cv.tying_
            assert cv.tying_ == cv.tyings_[cv.index_min_[1]]
    assert chosen["regions"] < max(TYINGS)
    assert chosen["cnn"] >= 10 * chosen["regions"]


# --------------------------------------------------------------- claim 4
BOUNDARY_SEED = 0  # fixed before any result was seen, as SEED


def _interior_agreement(kernels, regions) -> float:
    """k-means (2 groups) on the interior positions' kernel vectors vs the true halves, up to label swap."""
    H, W = regions.shape
    inner = np.zeros((H, W), dtype=bool)
    inner[1:-1, 1:-1] = True  # positions where all 9 offsets exist
    v = kernels.reshape(H, W, -1)[inner]
    if np.ptp(v, axis=0).max() <= 1e-6 * np.abs(v).max():
        return 0.5  # everything fused into one kernel: no two groups
    labels = KMeans(2, n_init=10, random_state=0).fit_predict(v)
    agree = float(np.mean(labels == regions[inner]))
    return max(agree, 1.0 - agree)


def _boundary_fit(seed: int):
    """Fourth study's design: the 'grid'/'l1' fit at tying 0.1, started from the best of 10 'grid'/'l2' fits."""
    X, y, info = make_soft_conv_data(teacher="regions", random_state=seed, **DATA_LARGE)
    y = (y - y.mean()) / y.std()  # tying in units of var(y): the spread of y varies 80-fold over seeds
    student = SoftConvRegressor(channels=1, kernel_size=3, support=3, pooling="avg", tying=0.1,
                                tying_penalty="l2", tying_graph="grid", n_init=10, max_iter=1000,
                                random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        student.fit(X[:700], y[:700])
        student.set_params(tying_penalty="l1", solver="fista", warm_start=True, max_iter=500)
        student.fit(X[:700], y[:700])
    kernels = student.network_.soft_layers[0].kernels().detach().cpu().numpy()[:, 0, :]
    return _interior_agreement(kernels, info.regions), student.score(X[700:], y[700:])


@pytest.mark.slow
def test_grid_l1_tying_recovers_region_boundary():
    """Claim 4 on seed BOUNDARY_SEED: the fused-lasso groups agree with the true halves on >= 90%."""
    agreement, r2 = _boundary_fit(BOUNDARY_SEED)
    assert agreement >= 0.9
    # and the kernels estimate the teacher's (0.92 attainable; spurious basins scored -0.1 to 0.85)
    assert r2 >= 0.7

