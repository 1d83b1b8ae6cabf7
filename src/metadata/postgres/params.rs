//! Statement parameters with their PostgreSQL types spelled out, so every statement runs as an
//! unnamed one in a single round trip (`query_typed`). No named prepared statement is ever
//! created: behind PgBouncer in transaction mode consecutive statements may run on different
//! server connections, where a statement prepared on one does not exist on the other (and a
//! name left behind collides with another client's).

use tokio_postgres::types::{ToSql, Type};

/// A Rust value and the PostgreSQL type it is sent as.
pub(super) trait Param: ToSql + Sync {
    const TYPE: Type;
}

macro_rules! param_types {
    ($($rust:ty => $pg:ident),* $(,)?) => {
        $(impl Param for $rust { const TYPE: Type = Type::$pg; })*
    };
}

param_types! {
    &String => TEXT,
    &i64 => INT8,
    &str => TEXT,
    String => TEXT,
    i64 => INT8,
    i32 => INT4,
    bool => BOOL,
    &[u8] => BYTEA,
    Vec<u8> => BYTEA,
    Vec<String> => TEXT_ARRAY,
    Vec<&str> => TEXT_ARRAY,
    Vec<i64> => INT8_ARRAY,
}

impl<T: Param> Param for Option<T> {
    const TYPE: Type = T::TYPE;
}

/// One typed parameter: `params!` builds slices of these.
pub(super) fn typed<T: Param>(value: &T) -> (&(dyn ToSql + Sync), Type) {
    (value, T::TYPE)
}

/// `params![&a, &b]`: the parameters of a `query_typed`/`execute_typed` call.
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        &[$($crate::metadata::postgres::params::typed($value)),*]
    };
}
