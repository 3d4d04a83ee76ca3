//! Log output on stderr: `TIME LEVEL message` for people, or one JSON object per line for log
//! collectors, with the request fields as JSON fields. serde_json does the escaping.

use crate::cli::LogFormat;
use log::kv::{self, Key, Value, VisitSource};
use std::io::Write;

pub fn init(format: LogFormat) {
    let env = env_logger::Env::default().default_filter_or("info");
    let mut builder = env_logger::Builder::from_env(env);
    match format {
        LogFormat::Text => builder.format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        }),
        LogFormat::Json => builder.format(|buf, record| {
            let mut object = serde_json::Map::new();
            object.insert("time".into(), buf.timestamp_millis().to_string().into());
            object.insert("level".into(), record.level().as_str().into());
            object.insert("message".into(), record.args().to_string().into());
            let _ = record.key_values().visit(&mut JsonFields(&mut object));
            writeln!(buf, "{}", serde_json::Value::Object(object))
        }),
    };
    builder.init();
}

/// Copies a record's key-values into the JSON object, typed: numbers and booleans as such,
/// `None` as `null`, slices as arrays (through serde), what was captured with `%` or `?` as a
/// string.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl<'kvs> VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let json = serde_json::to_value(&value).unwrap_or_else(|_| value.to_string().into());
        self.0.insert(key.as_str().to_owned(), json);
        Ok(())
    }
}
