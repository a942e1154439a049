//! Helm chart tests (stub while the charts are written).
