//! Redis store.
#[derive(Clone)] pub struct RedisStore;
