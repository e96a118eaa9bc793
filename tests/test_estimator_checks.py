"""scikit-learn's own estimator checks, legacy checks included, nothing expected to fail."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from softcnn import SoftConvClassifier, SoftConvRegressor


@parametrize_with_checks(
    [
        SoftConvClassifier(random_state=0),
        SoftConvRegressor(random_state=0),
        # a non-smooth penalty: proximal (FISTA) fits on merged duplicates
        SoftConvRegressor(tying=0.1, tying_penalty="l1", random_state=0),
        SoftConvClassifier(channel_sparsity=0.01, random_state=0),
    ],
    legacy=True,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
