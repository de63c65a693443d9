"""An offline feature dashboard: one self-contained HTML page (all JS and CSS inline; opens from
disk) of a saved dictionary's features, with circuit-tracer feature files beside it.

- `collect.py`: one streaming pass over text (`feature_statistics`, its options in
  `StatisticsConfig`): per feature exact density and maximum, running top examples and a uniform
  sample of activations (bounded memory, on the CPU).
- `directions.py`: decoder directions through the unembedding (logit lens), source connections (an
  SCAE suite's selected connections, or virtual weights from an earlier dictionary).
- `render.py`: records in circuit-tracer's feature-file schema, the page (`template.html`), the
  output folder.
- `pipeline.py`: `dashboard` (the command: a saved dictionary's model, hook point and features; its
  options in `DashboardCommandConfig`) and `build_dashboard` (a loaded dictionary and model, as the
  quickstart has them; its options in `DashboardConfig`).
"""

from .collect import FeatureStatistics, StatisticsConfig, feature_statistics, keep_smallest
from .directions import (
                       decoder_directions,
                       encoder_rows,
                       logit_lens,
                       suite_connections,
                       virtual_weight_connections,
)
from .pipeline import (
                       DashboardCommandConfig,
                       DashboardConfig,
                       build_dashboard,
                       dashboard,
                       hook_from_config,
                       parse_features,
)
from .render import circuit_tracer_feature, feature_records, write_dashboard

__all__ = [
    "DashboardCommandConfig", "DashboardConfig", "FeatureStatistics", "StatisticsConfig",
    "build_dashboard", "circuit_tracer_feature", "dashboard", "decoder_directions", "encoder_rows",
    "feature_records", "feature_statistics", "hook_from_config", "keep_smallest", "logit_lens",
    "parse_features", "suite_connections", "virtual_weight_connections", "write_dashboard",
]
