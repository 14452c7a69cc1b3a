//! In-process store.
#[derive(Clone)] pub struct MemoryStore;
