//! The rater: prices closed windows into line items on the ledger topic. Not built yet.
