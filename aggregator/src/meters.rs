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
use serde::{Deserialize, Serialize};

/// The stored form: a version, then the shapes (postcard, whose fields are positional: a
/// field or enum variant of [`neruba_schemas::MeterShape`] may only be appended).
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    v: u8,
    shapes: MeterShapes,
}

/// The shapes kept in `store`: none in state written before they were kept, nor in a record
/// this build cannot read (logged: the check cannot be made, and a record nobody can read
/// must not keep a partition from opening).
pub fn kept(store: &Store) -> Result<MeterShapes> {
    let Some(bytes) = store.get(keys::META_METERS)? else {
        return Ok(MeterShapes::new());
    };
    match postcard::from_bytes::<Kept>(&bytes) {
        Ok(kept) if kept.v == 1 => Ok(kept.shapes),
        Ok(kept) => {
            tracing::warn!(
                partition = store.partition(),
                v = kept.v,
                "Kept meter shapes of a version this build does not know; not checked, and written again as this catalog's."
            );
            Ok(MeterShapes::new())
        }
        Err(e) => {
            tracing::warn!(partition = store.partition(), error = %e, "Kept meter shapes unreadable; not checked, and written again as this catalog's.");
            Ok(MeterShapes::new())
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
        let record = Kept {
            v: 1,
            shapes: std::mem::take(kept),
        };
        let bytes = postcard::to_stdvec(&record)
            .map_err(|e| Error::Bug(format!("meter shapes encoding: {e}")))?;
        *kept = record.shapes;
        store.put_now(keys::META_METERS, &bytes)?;
    }
    Ok(())
}
