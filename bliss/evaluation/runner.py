"""Score every trial of a setting with every row of the sweep, and measure it.

BLISS, IC and Biased-CLIP scores come from :meth:`bliss.scorer.Scorer.score`, the code
path of the server and of local scoring. The only shortcut is where the eq. 7 search
happens: the test split is the same in every trial and row, so each dictionary is
searched once for the largest K of the sweep, and each Scorer is handed those results
(a row with a smaller K takes the first K: the exact index's top K, up to ties within
float32 rounding).
Work that depends on a normal class but not on the trial (its eq. 4/8 statistics over all
its training images, its DN2 nearest neighbours) is done once per class and shared by
every trial and setting; a trial with few shots draws its own images and computes its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bliss.class_statistics import (
    ClassMoments,
    ClassStatistics,
    StatisticsTable,
    class_statistics,
    statistics_table,
)
from bliss.errors import InvalidInputError
from bliss.evaluation.baselines import knn_distance_scores, mcm_scores, nearest_similarities
from bliss.evaluation.encoded_benchmark import EncodedBenchmark, EncodedDictionary, TrialData
from bliss.evaluation.metrics import DetectionMetrics, MetricSummary, detection_metrics, summarise
from bliss.evaluation.splits import Setting, Trial
from bliss.evaluation.sweeps import Method, Row, SweepConfig
from bliss.scorer import Scorer, ScoringDefaults, normalised_embeddings
from bliss.scoring import ScoringMode

if TYPE_CHECKING:
    from bliss.scoring import ScoreBatch

logger = logging.getLogger(__name__)

SCORE_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class TopEntries:
    """The eq. 7 search of the whole test split in one dictionary, for the sweep's largest K."""

    similarities: np.ndarray  # float64 [m, K_max], most similar first
    ids: np.ndarray  # int64 [m, K_max]
    dim: int
    ntotal: int


class PrecomputedSearch:
    """Stands in for the DictionaryIndex of a Scorer that scores one block of test rows."""

    def __init__(self, top: TopEntries, rows: slice) -> None:
        self.similarities = top.similarities[rows]
        self.ids = top.ids[rows]
        self.dim = top.dim
        self.ntotal = top.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if queries.shape[0] != self.ids.shape[0] or not 1 <= k <= self.ids.shape[1]:
            raise InvalidInputError(
                f"precomputed search holds {self.ids.shape[0]} queries up to K="
                f"{self.ids.shape[1]}; asked for {queries.shape[0]} queries, K={k}"
            )
        return self.similarities[:, :k], self.ids[:, :k]


def search_test_split(test: np.ndarray, dictionary: EncodedDictionary, k_max: int) -> TopEntries:
    """Search the (normalised) test rows in an exact FAISS index of ``dictionary``."""
    from bliss.dictionary_index import build_index

    size = dictionary.embeddings.shape[0]
    if k_max > size:
        raise InvalidInputError(
            f"K={k_max} is larger than dictionary {dictionary.name!r} ({size} entries): "
            "lower --k or use a larger dictionary"
        )
    index = build_index(dictionary.embeddings)
    similarities = np.empty((len(test), k_max), dtype=np.float64)
    ids = np.empty((len(test), k_max), dtype=np.int64)
    for rows in _chunks(len(test)):
        queries = normalised_embeddings(test[rows], index.dim)
        similarities[rows], ids[rows] = index.search(queries, k_max)
    return TopEntries(similarities, ids, index.dim, index.ntotal)


class ClassWork:
    """Per-class results over all of a class's training images, made once, used by any trial."""

    def __init__(
        self, benchmark: EncodedBenchmark, dictionaries: dict[str, EncodedDictionary]
    ) -> None:
        self.benchmark = benchmark
        self.dictionaries = dictionaries
        self._statistics: dict[tuple[int, str], ClassStatistics] = {}
        self._neighbours: dict[tuple[int, int], np.ndarray] = {}

    def _members(self, class_position: int) -> np.ndarray:
        return self.benchmark.train[self.benchmark.train_labels == class_position]

    def statistics(self, class_position: int, dictionary: str) -> ClassStatistics:
        key = (class_position, dictionary)
        if key not in self._statistics:
            members = self._members(class_position)
            self._statistics[key] = class_statistics(
                self.benchmark.class_text[class_position],
                self.dictionaries[dictionary].embeddings,
                ClassMoments.of(members),
                members,
            )
        return self._statistics[key]

    def neighbours(self, class_position: int, k: int) -> np.ndarray:
        """Similarities [m, k] of every test image to its k nearest images of the class."""
        key = (class_position, k)
        if key not in self._neighbours:
            members = self._members(class_position)
            self._neighbours[key] = nearest_similarities(self.benchmark.test, members, k)
        return self._neighbours[key]


@dataclass(frozen=True)
class TrialRecord:
    index: int
    normal: tuple[str, ...]
    normal_images: int  # at the base number of shots
    test_normal: int
    test_anomalies: int


@dataclass
class RowResult:
    row: Row
    per_trial: list[DetectionMetrics | None] = field(default_factory=list)
    note: str | None = None  # why some trials have no value

    def summary(self) -> dict[str, MetricSummary] | None:
        values = [m for m in self.per_trial if m is not None]
        return summarise(values) if values else None


@dataclass(frozen=True)
class TrialScores:
    """What the figures need from one trial (base rows only)."""

    is_anomaly: np.ndarray  # bool [m]
    scores: dict[Method, np.ndarray]  # [m] per base method that has a value
    internal: np.ndarray | None  # [m] BLISS's IC and ET at the nearest class
    external: np.ndarray | None


@dataclass
class SettingResult:
    setting: Setting
    trials: list[TrialRecord]
    rows: list[RowResult]
    trial_scores: list[TrialScores]
    dictionary_similarity: np.ndarray  # [m] mean sim of each test image to the base dictionary
    seconds: float
    all_scores: dict[str, np.ndarray] | None = None  # '<row>/<trial>' -> scores, when kept


def run_setting(
    benchmark: EncodedBenchmark,
    dictionaries: dict[str, EncodedDictionary],
    searches: dict[str, TopEntries],
    setting: Setting,
    config: SweepConfig,
    *,
    seed: int,
    keep_all_scores: bool = False,
    class_work: ClassWork | None = None,
) -> SettingResult:
    """Every row on every trial of ``setting``; pass one ``class_work`` to all settings."""
    started = time.perf_counter()
    class_work = class_work or ClassWork(benchmark, dictionaries)
    rows = config.rows()
    results = [RowResult(row) for row in rows]
    trials, trial_scores = [], []
    all_scores: dict[str, np.ndarray] | None = {} if keep_all_scores else None
    for trial in setting.trials:
        evaluation = _TrialEvaluation(
            benchmark, dictionaries, searches, config, trial, seed, class_work
        )
        base = evaluation.data(config.base_shots)
        trials.append(
            TrialRecord(
                index=trial.index,
                normal=base.class_names,
                normal_images=len(base.normal),
                test_normal=int((~base.test_is_anomaly).sum()),
                test_anomalies=int(base.test_is_anomaly.sum()),
            )
        )
        kept: dict[Method, np.ndarray] = {}
        internal = external = None
        for number, (row, result) in enumerate(zip(rows, results, strict=True)):
            outcome = evaluation.scores(row)
            if outcome is None:
                result.per_trial.append(None)
                result.note = "undefined for one normal class (softmax over one class is 1)"
                continue
            scores, batch = outcome
            result.per_trial.append(detection_metrics(scores, base.test_is_anomaly))
            if row.base:
                kept[row.method] = scores
                if row.method is Method.BLISS:
                    assert batch is not None, "BLISS rows are scored with their IC and ET"
                    internal, external = batch
            if all_scores is not None:
                all_scores[f"{number}/{trial.index}"] = scores.astype(np.float32)
        trial_scores.append(TrialScores(base.test_is_anomaly, kept, internal, external))
        logger.info(
            "%s trial %d: normal %s", setting.title, trial.index, ", ".join(base.class_names)
        )
    base_dictionary = dictionaries[config.base_dictionary].embeddings
    dictionary_mean = base_dictionary.astype(np.float64).mean(axis=0)
    return SettingResult(
        setting=setting,
        trials=trials,
        rows=results,
        trial_scores=trial_scores,
        dictionary_similarity=benchmark.test.astype(np.float64) @ dictionary_mean,
        seconds=time.perf_counter() - started,
        all_scores=all_scores,
    )


class _TrialEvaluation:
    """One trial: its normal banks and statistics, made once and shared by the rows."""

    def __init__(
        self,
        benchmark: EncodedBenchmark,
        dictionaries: dict[str, EncodedDictionary],
        searches: dict[str, TopEntries],
        config: SweepConfig,
        trial: Trial,
        seed: int,
        class_work: ClassWork,
    ) -> None:
        self.class_work = class_work
        self.benchmark = benchmark
        self.dictionaries = dictionaries
        self.searches = searches
        self.config = config
        self.trial = trial
        self.seed = seed
        self._data: dict[int | None, TrialData] = {}
        self._tables: dict[tuple[int | None, str], StatisticsTable] = {}

    def data(self, shots: int | None) -> TrialData:
        if shots not in self._data:
            self._data[shots] = self.benchmark.trial_data(self.trial, shots, self.seed)
        return self._data[shots]

    def scores(self, row: Row) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None] | None:
        """Scores [m] of ``row`` (with IC and ET for BLISS), or None when undefined."""
        test = self.benchmark.test
        if row.method is Method.MCM:
            labels = self.data(None).label_embeddings
            if len(labels) < 2:
                return None
            return mcm_scores(test, labels, self.config.mcm_temperature), None
        if row.method is Method.DN2:
            assert row.k is not None, "DN2 rows carry their k (SweepConfig._base_row)"
            return knn_distance_scores(self._neighbour_candidates(row.shots, row.k), row.k), None
        shots = row.shots if row.method.uses_normal_images else self.config.base_shots
        dictionary = row.dictionary or self.config.base_dictionary
        k = row.k or self.config.base_k
        lam = row.lam if row.lam is not None else self.config.base_lambda
        score, internal, external = self._scored(
            shots, dictionary, ScoringMode(row.method.value), k, lam
        )
        return score, (internal, external) if row.method is Method.BLISS else None

    def _scored(
        self, shots: int | None, dictionary: str, mode: ScoringMode, k: int, lam: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = self.data(shots)
        table = self._table(shots, dictionary)
        top = self.searches[dictionary]
        test = self.benchmark.test
        parts: list[ScoreBatch] = []
        for rows in _chunks(len(test)):
            scorer = Scorer.from_arrays(
                index=PrecomputedSearch(top, rows),
                entry_texts=self.dictionaries[dictionary].texts,
                class_names=list(data.class_names),
                label_embeddings=data.label_embeddings,
                table=table,
                defaults=ScoringDefaults(k=k, lam=lam),
            )
            parts.append(scorer.score(test[rows], mode=mode, k=k, lam=lam))
        return (
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.internal_class_score for p in parts]),
            np.concatenate([p.external_text_score for p in parts]),
        )

    def _neighbour_candidates(self, shots: int | None, k: int) -> np.ndarray:
        if shots is None:
            return np.hstack([self.class_work.neighbours(c, k) for c in self.trial.normal])
        return nearest_similarities(self.benchmark.test, self.data(shots).normal, k)

    def _table(self, shots: int | None, dictionary: str) -> StatisticsTable:
        key = (shots, dictionary)
        if key not in self._tables:
            if shots is None:
                self._tables[key] = StatisticsTable.stack(
                    [self.class_work.statistics(c, dictionary) for c in self.trial.normal]
                )
            else:
                data = self.data(shots)
                self._tables[key] = statistics_table(
                    data.normal,
                    data.normal_labels,
                    data.label_embeddings,
                    self.dictionaries[dictionary].embeddings,
                )
        return self._tables[key]


def _chunks(count: int) -> list[slice]:
    return [slice(s, min(s + SCORE_CHUNK_ROWS, count)) for s in range(0, count, SCORE_CHUNK_ROWS)]
