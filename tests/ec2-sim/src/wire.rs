//! The EC2 Query protocol: form-encoded parameters in, namespaced XML out.

use std::collections::BTreeMap;
use std::fmt::{self, Write};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub const API_VERSION: &str = "2016-11-15";
pub const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// An EC2 error as it goes on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    /// A client error (HTTP 400), the status of nearly every EC2 error.
    pub fn client(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn with_status(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn invalid_value(param: &str, value: &str, why: &str) -> Self {
        Self::client(
            "InvalidParameterValue",
            format!("Value ({value}) for parameter {param} is invalid. {why}"),
        )
    }

    pub fn missing(param: &str) -> Self {
        Self::client(
            "MissingParameter",
            format!("The request must contain the parameter {param}"),
        )
    }

    /// The XML body EC2 sends with an error.
    pub fn to_xml(&self, request_id: &str) -> String {
        let mut out = String::from(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        out.push_str("<Response><Errors><Error><Code>");
        escape_into(&mut out, &self.code);
        out.push_str("</Code><Message>");
        escape_into(&mut out, &self.message);
        out.push_str("</Message></Error></Errors><RequestID>");
        escape_into(&mut out, request_id);
        out.push_str("</RequestID></Response>");
        out
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

pub type ApiResult<T> = Result<T, ApiError>;

/// Decoded request parameters, keyed by their full dotted name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn parse(body: &[u8]) -> Self {
        Self(form_urlencoded::parse(body).into_owned().collect())
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key).map(str::to_string)
    }

    pub fn required(&self, key: &str) -> ApiResult<&str> {
        self.get(key).ok_or_else(|| ApiError::missing(key))
    }

    pub fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::invalid_value(key, v, "Expected a boolean.")),
        }
    }

    pub fn int(&self, key: &str) -> ApiResult<Option<i64>> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::invalid_value(key, v, "Expected an integer."))
            })
            .transpose()
    }

    /// Values of a flattened list of scalars: `Prefix.1`, `Prefix.2`, ...
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let mut items: Vec<(u32, String)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(prefix)?.strip_prefix('.')?;
                Some((rest.parse().ok()?, v.clone()))
            })
            .collect();
        items.sort_by_key(|(n, _)| *n);
        items.into_iter().map(|(_, v)| v).collect()
    }

    /// Members of a flattened list of structures: `Prefix.N.Field...`.
    pub fn members(&self, prefix: &str) -> Vec<Params> {
        let mut groups: BTreeMap<u32, Params> = BTreeMap::new();
        for (k, v) in &self.0 {
            let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
                continue;
            };
            let Some((index, field)) = rest.split_once('.') else {
                continue;
            };
            if let Ok(n) = index.parse() {
                groups
                    .entry(n)
                    .or_default()
                    .0
                    .insert(field.to_string(), v.clone());
            }
        }
        groups.into_values().collect()
    }

    /// The nested structure under `Prefix.`.
    pub fn nested(&self, prefix: &str) -> Params {
        Params(
            self.0
                .iter()
                .filter_map(|(k, v)| {
                    let field = k.strip_prefix(prefix)?.strip_prefix('.')?;
                    Some((field.to_string(), v.clone()))
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// EC2's timestamp format: RFC 3339 in UTC with milliseconds.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

pub fn parse_timestamp(param: &str, value: &str) -> ApiResult<OffsetDateTime> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map_err(|_| ApiError::invalid_value(param, value, "Expected an ISO 8601 timestamp."))
}

pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

/// A small writer for EC2 response documents.
pub struct Xml {
    out: String,
    root: String,
}

impl Xml {
    pub fn response(action: &str, request_id: &str) -> Self {
        let root = format!("{action}Response");
        let mut out = String::from(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = write!(out, r#"<{root} xmlns="{XMLNS}">"#);
        let mut xml = Self { out, root };
        xml.field("requestId", request_id);
        xml
    }

    pub fn open(&mut self, name: &str) -> &mut Self {
        let _ = write!(self.out, "<{name}>");
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        let _ = write!(self.out, "</{name}>");
        self
    }

    pub fn field(&mut self, name: &str, value: impl fmt::Display) -> &mut Self {
        let _ = write!(self.out, "<{name}>");
        escape_into(&mut self.out, &value.to_string());
        let _ = write!(self.out, "</{name}>");
        self
    }

    pub fn opt(&mut self, name: &str, value: Option<impl fmt::Display>) -> &mut Self {
        if let Some(value) = value {
            self.field(name, value);
        }
        self
    }

    /// A `<name><item>..</item>...</name>` list.
    pub fn list<T>(&mut self, name: &str, items: &[T], mut each: impl FnMut(&mut Self, &T)) {
        self.open(name);
        for item in items {
            self.open("item");
            each(self, item);
            self.close("item");
        }
        self.close(name);
    }

    pub fn tags<'a>(&mut self, tags: impl IntoIterator<Item = (&'a String, &'a String)>) {
        self.open("tagSet");
        for (k, v) in tags {
            self.open("item")
                .field("key", k)
                .field("value", v)
                .close("item");
        }
        self.close("tagSet");
    }

    pub fn finish(mut self) -> String {
        let root = std::mem::take(&mut self.root);
        self.close(&root);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_members_follow_numeric_order() {
        let p = Params::from_pairs([
            ("ImageId.10", "ami-j"),
            ("ImageId.2", "ami-b"),
            ("ImageId.1", "ami-a"),
            ("Filter.2.Name", "state"),
            ("Filter.2.Value.1", "available"),
            ("Filter.1.Name", "tag:team"),
            ("Filter.1.Value.2", "b"),
            ("Filter.1.Value.1", "a"),
        ]);
        assert_eq!(p.list("ImageId"), ["ami-a", "ami-b", "ami-j"]);
        let filters = p.members("Filter");
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0].get("Name"), Some("tag:team"));
        assert_eq!(filters[0].list("Value"), ["a", "b"]);
        assert_eq!(filters[1].list("Value"), ["available"]);
    }

    #[test]
    fn nested_strips_the_prefix() {
        let p = Params::from_pairs([
            ("LaunchPermission.Add.1.UserId", "111122223333"),
            ("LaunchPermission.Remove.1.Group", "all"),
        ]);
        let add = p.nested("LaunchPermission.Add").members("");
        assert!(add.is_empty(), "an empty prefix is not a list");
        let add = p.nested("LaunchPermission").members("Add");
        assert_eq!(add[0].get("UserId"), Some("111122223333"));
    }

    #[test]
    fn errors_are_escaped() {
        let xml = ApiError::client("X", "a <b> & 'c'").to_xml("r1");
        assert!(xml.contains("<Message>a &lt;b&gt; &amp; &apos;c&apos;</Message>"));
        assert!(xml.contains("<RequestID>r1</RequestID>"));
    }

    #[test]
    fn timestamps_have_milliseconds_and_zulu() {
        let t = time::macros::datetime!(2025-03-04 05:06:07.089 UTC);
        assert_eq!(timestamp(t), "2025-03-04T05:06:07.089Z");
    }

    #[test]
    fn booleans_reject_garbage() {
        let p = Params::from_pairs([("Encrypted", "yes")]);
        assert_eq!(
            p.bool("Encrypted").unwrap_err().code,
            "InvalidParameterValue"
        );
    }
}
