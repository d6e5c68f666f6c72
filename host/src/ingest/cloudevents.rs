//! CloudEvents 1.0 over HTTP: binary mode (`ce-*` headers, the body is the data), structured
//! mode (`application/cloudevents+json`) and batch mode (`application/cloudevents-batch+json`),
//! each turned into the parts of an [`Event`](crate::event::Event). Required attributes are
//! checked (`id`, `source`, `specversion` = `1.0`, `type`); `source`, `subject`, `time`,
//! `dataschema` and extensions become event attributes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hyper::{HeaderMap, header};
use serde_json::Value;

use super::IngestError;

/// Content type of structured mode.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// Content type of batch mode.
pub const BATCH: &str = "application/cloudevents-batch+json";
/// The only spec version accepted.
pub const SPEC_VERSION: &str = "1.0";
const HEADER_PREFIX: &str = "ce-";
const DEFAULT_DATA_TYPE: &str = "application/octet-stream";

/// How a request carries its events, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Attributes in `ce-*` headers, the body is the data.
    Binary,
    /// One JSON-encoded event.
    Structured,
    /// A JSON array of events.
    Batch,
}

impl Mode {
    /// The mode a content type (essence, lower-case) announces; anything else is binary.
    pub fn of(content_type: &str) -> Mode {
        if content_type.starts_with("application/cloudevents-batch") {
            Mode::Batch
        } else if content_type.starts_with("application/cloudevents") {
            Mode::Structured
        } else {
            Mode::Binary
        }
    }
}

/// One CloudEvent, ready to become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    /// `id`.
    pub id: String,
    /// `type`, kept as the producer wrote it.
    pub event_type: String,
    /// `datacontenttype`, or the binary request's Content-Type.
    pub content_type: String,
    /// The data.
    pub data: Bytes,
    /// Every other attribute: `source`, `subject`, `time`, `dataschema`, extensions.
    pub attributes: Vec<(String, String)>,
}

/// A binary-mode event from its `ce-*` headers and body.
pub fn from_binary(headers: &HeaderMap, body: Bytes) -> Result<CloudEvent, IngestError> {
    let mut attributes = Vec::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix(HEADER_PREFIX) else { continue };
        check_attribute_name(attribute)?;
        let text =
            value.to_str().map_err(|_| IngestError::BadRequest(format!("header {name} is not visible ASCII")))?;
        let decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| IngestError::BadRequest(format!("header {name} is not percent-encoded UTF-8")))?;
        if attribute == "datacontenttype" {
            return Err(IngestError::BadRequest(
                "binary mode takes the data's type from Content-Type, not ce-datacontenttype".into(),
            ));
        }
        if attributes.iter().any(|(seen, _)| seen == attribute) {
            return Err(IngestError::BadRequest(format!("header {name} appears more than once")));
        }
        attributes.push((attribute.to_owned(), decoded.into_owned()));
    }
    let content_type =
        headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or(DEFAULT_DATA_TYPE).to_owned();
    finish(attributes, content_type, body)
}

/// A structured-mode event from its JSON.
pub fn from_structured(json: &Value) -> Result<CloudEvent, IngestError> {
    let object = json
        .as_object()
        .ok_or_else(|| IngestError::BadRequest("a structured CloudEvent must be a JSON object".into()))?;
    let mut attributes = Vec::new();
    let mut content_type = None;
    for (name, value) in object {
        if matches!(name.as_str(), "data" | "data_base64") || value.is_null() {
            continue;
        }
        check_attribute_name(name)?;
        let text = match value {
            Value::String(text) => text.clone(),
            Value::Number(_) | Value::Bool(_) => value.to_string(),
            _ => {
                return Err(IngestError::BadRequest(format!(
                    "CloudEvent attribute {name} must be a string, number or boolean"
                )));
            }
        };
        if name == "datacontenttype" {
            content_type = Some(text);
        } else {
            attributes.push((name.clone(), text));
        }
    }
    let (data, content_type) = match (object.get("data_base64"), object.get("data")) {
        (Some(_), Some(data)) if !data.is_null() => {
            return Err(IngestError::BadRequest("a CloudEvent has data or data_base64, not both".into()));
        }
        (Some(Value::String(encoded)), _) => {
            let data =
                STANDARD.decode(encoded).map_err(|_| IngestError::BadRequest("data_base64 is not base64".into()))?;
            (Bytes::from(data), content_type.unwrap_or_else(|| DEFAULT_DATA_TYPE.to_owned()))
        }
        (Some(_), _) => return Err(IngestError::BadRequest("data_base64 must be a string".into())),
        (None, Some(Value::String(text))) if content_type.as_deref().is_some_and(|t| !is_json(t)) => {
            (Bytes::from(text.clone()), content_type.unwrap_or_default())
        }
        (None, Some(data)) if !data.is_null() => {
            (Bytes::from(data.to_string()), content_type.unwrap_or_else(|| "application/json".to_owned()))
        }
        (None, _) => (Bytes::new(), content_type.unwrap_or_else(|| "application/json".to_owned())),
    };
    finish(attributes, content_type, data)
}

/// The events of a batch, each checked on its own so one bad event spoils no other.
pub fn from_batch(json: &Value) -> Result<Vec<Result<CloudEvent, IngestError>>, IngestError> {
    let events =
        json.as_array().ok_or_else(|| IngestError::BadRequest("a CloudEvents batch must be a JSON array".into()))?;
    Ok(events.iter().map(from_structured).collect())
}

/// Checks the required attributes and takes `id`, `type` and `specversion` out of the rest.
fn finish(mut attributes: Vec<(String, String)>, content_type: String, data: Bytes) -> Result<CloudEvent, IngestError> {
    let mut take = |name: &str| {
        let position = attributes.iter().position(|(key, value)| key == name && !value.is_empty());
        position.map(|position| attributes.remove(position).1)
    };
    let missing = |name: &str| IngestError::BadRequest(format!("the CloudEvent has no {name} attribute"));
    let id = take("id").ok_or_else(|| missing("id"))?;
    let event_type = take("type").ok_or_else(|| missing("type"))?;
    let version = take("specversion").ok_or_else(|| missing("specversion"))?;
    if version != SPEC_VERSION {
        return Err(IngestError::BadRequest(format!("specversion {version} is not supported; send {SPEC_VERSION}")));
    }
    if !attributes.iter().any(|(key, value)| key == "source" && !value.is_empty()) {
        return Err(missing("source"));
    }
    Ok(CloudEvent { id, event_type, content_type, data, attributes })
}

/// Attribute names are lower-case ASCII letters and digits.
fn check_attribute_name(name: &str) -> Result<(), IngestError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(IngestError::BadRequest(format!(
            "CloudEvent attribute name {name:?} must be lower-case letters and digits"
        )));
    }
    Ok(())
}

/// Whether a media type is JSON; media types are case-insensitive.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence.ends_with("/json") || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (header::HeaderName::from_static(name), value.parse().expect("value")))
            .collect()
    }

    const REQUIRED: [(&str, &str); 4] = [
        ("ce-id", "A234-1234"),
        ("ce-source", "/mycontext"),
        ("ce-specversion", "1.0"),
        ("ce-type", "com.example.someevent"),
    ];

    #[test]
    fn binary_mode_takes_headers_as_attributes_and_the_body_as_data() {
        let mut pairs: Vec<(&'static str, &str)> = REQUIRED.to_vec();
        pairs.extend([("ce-subject", "a%20b"), ("ce-comexampleext", "x"), ("content-type", "text/plain")]);
        let event = from_binary(&binary_headers(&pairs), Bytes::from_static(b"hello")).expect("valid");
        assert_eq!((event.id.as_str(), event.event_type.as_str()), ("A234-1234", "com.example.someevent"));
        assert_eq!((event.content_type.as_str(), &event.data[..]), ("text/plain", &b"hello"[..]));
        for attribute in [("source", "/mycontext"), ("subject", "a b"), ("comexampleext", "x")] {
            assert!(
                event.attributes.contains(&(attribute.0.to_owned(), attribute.1.to_owned())),
                "{:?}",
                event.attributes
            );
        }
    }

    #[test]
    fn each_missing_required_attribute_is_named() {
        for (skip, _) in REQUIRED {
            let pairs: Vec<_> = REQUIRED.iter().copied().filter(|(name, _)| *name != skip).collect();
            let err = from_binary(&binary_headers(&pairs), Bytes::new()).expect_err("missing");
            assert!(err.to_string().contains(skip.trim_start_matches("ce-")), "{skip}: {err}");
        }
        let mut pairs = REQUIRED.to_vec();
        pairs[2] = ("ce-specversion", "0.3");
        assert!(from_binary(&binary_headers(&pairs), Bytes::new()).expect_err("0.3").to_string().contains("0.3"));
    }

    #[test]
    fn a_repeated_attribute_header_is_refused() {
        let mut headers = binary_headers(&REQUIRED);
        headers.append("ce-id", "other".parse().expect("value"));
        let err = from_binary(&headers, Bytes::new()).expect_err("two ids");
        assert!(err.to_string().contains("ce-id appears more than once"), "{err}");
    }

    #[test]
    fn media_types_are_json_whatever_their_case() {
        assert!(is_json("Application/JSON; charset=utf-8") && is_json("application/cloudevents+JSON"));
        assert!(!is_json("text/plain"));
    }

    #[test]
    fn structured_mode_reads_json_data_base64_and_extensions() {
        let json = serde_json::json!({
            "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext", "id": "C234-1234",
            "time": "2018-04-05T17:31:00Z", "comexampleextension1": "value", "comexampleothervalue": 5,
            "datacontenttype": "application/json", "data": {"appinfoA": "abc"}
        });
        let event = from_structured(&json).expect("valid");
        assert_eq!((event.content_type.as_str(), &event.data[..]), ("application/json", &br#"{"appinfoA":"abc"}"#[..]));
        assert!(event.attributes.contains(&("comexampleothervalue".to_owned(), "5".to_owned())));
        assert!(event.attributes.contains(&("time".to_owned(), "2018-04-05T17:31:00Z".to_owned())));

        let binary =
            serde_json::json!({"specversion": "1.0", "type": "t", "source": "/s", "id": "1", "data_base64": "aGk="});
        assert_eq!(&from_structured(&binary).expect("valid").data[..], b"hi");
        let text = serde_json::json!({"specversion": "1.0", "type": "t", "source": "/s", "id": "1", "datacontenttype": "text/plain", "data": "hi"});
        assert_eq!(&from_structured(&text).expect("valid").data[..], b"hi");
        let both = serde_json::json!({"specversion": "1.0", "type": "t", "source": "/s", "id": "1", "data": 1, "data_base64": "aGk="});
        assert!(from_structured(&both).is_err());
        assert!(
            from_structured(&serde_json::json!({"specversion": "1.0", "type": "t", "id": "1"}))
                .expect_err("no source")
                .to_string()
                .contains("source")
        );
    }

    #[test]
    fn a_batch_checks_each_event_on_its_own() {
        let batch = serde_json::json!([
            {"specversion": "1.0", "type": "t", "source": "/s", "id": "1"},
            {"specversion": "1.0", "source": "/s", "id": "2"}
        ]);
        let events = from_batch(&batch).expect("an array");
        assert!(events[0].is_ok());
        assert!(events[1].as_ref().expect_err("no type").to_string().contains("type"));
        assert!(from_batch(&serde_json::json!({})).is_err());
    }

    #[test]
    fn modes_follow_the_content_type() {
        assert_eq!(Mode::of(STRUCTURED), Mode::Structured);
        assert_eq!(Mode::of(BATCH), Mode::Batch);
        assert_eq!(Mode::of("application/json"), Mode::Binary);
    }
}
