//! The meter shapes a partition's state was built under, kept with it ([`keys::META_METERS`]).
//!
//! A reload may not change how a meter counts ([`neruba_schemas::MeterShape`]); neither may a
//! restart, which is how a catalog changes on Kubernetes (a new ConfigMap rolls the pods). So
//! each partition keeps the shape of every meter key it ran under, removed ones included, and
//! a partition opened under a catalog that reshapes one is refused, as a reload would be
//! ([`neruba_schemas::Catalog::keeps_shapes`]), unless the operator takes the change as it
//! is (`--accept-meter-changes`).

use crate::keys;
use crate::{Error, Result};
use neruba_schemas::{Catalog, MeterShapes};
use neruba_stage::Store;

/// The shapes kept in `store` (none in state written before they were kept).
pub fn kept(store: &Store) -> Result<MeterShapes> {
    match store.get(keys::META_METERS)? {
        None => Ok(MeterShapes::new()),
        Some(bytes) => {
            postcard::from_bytes(&bytes).map_err(|e| Error::corrupt("kept meter shapes", e))
        }
    }
}

/// Adds `catalog`'s meter shapes to `kept` (a key it has takes its shape) and writes them if
/// that changed them.
pub fn keep(store: &Store, kept: &mut MeterShapes, catalog: &Catalog) -> Result<()> {
    let mut changed = false;
    for (key, shape) in catalog.meter_shapes() {
        if kept.get(&key) != Some(&shape) {
            kept.insert(key, shape);
            changed = true;
        }
    }
    if changed {
        let bytes = postcard::to_stdvec(&*kept)
            .map_err(|e| Error::Bug(format!("meter shapes encoding: {e}")))?;
        store.put_now(keys::META_METERS, &bytes)?;
    }
    Ok(())
}
