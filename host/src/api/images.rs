//! Images carried by items, checked at the door.
//!
//! An item carries its image as `image_url` (`http(s)://...` or a `data:image/...;base64,` URL)
//! or as bytes: `image_base64` with `image_mime` (default `image/jpeg`). A stage passes it to the
//! provider as an `image_url` content part (eco-scan's `vision` does). The host checks these
//! fields when an item has them, so a bad image is a 4xx naming the item, not a failed item
//! later: the URL's scheme, the base64, the MIME type, and the decoded size against
//! `serve --max-image-mib`. `POST /v1/scans` also takes `multipart/form-data`: a file part named
//! `image` becomes `image_base64` + `image_mime`, and every text part a string field.

use std::borrow::Cow;

use axum::extract::Multipart;
use axum::extract::multipart::MultipartError;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ApiError;

#[derive(Deserialize)]
struct ImageFields<'a> {
    #[serde(default, borrow)]
    image_url: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    image_base64: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    image_mime: Option<Cow<'a, str>>,
}

/// Check the image fields of an item (JSON text); `what` names the item in errors.
pub fn check_item(item: &str, what: &str, max_bytes: usize) -> Result<(), ApiError> {
    // Items that are not objects, or have no image, are the pipeline's business.
    let Ok(fields) = serde_json::from_str::<ImageFields>(item) else {
        return Ok(());
    };
    if let Some(url) = &fields.image_url {
        if let Some(data) = url.strip_prefix("data:") {
            let (meta, payload) = data.split_once(',').ok_or_else(|| {
                ApiError::Unprocessable(format!("{what}: `image_url` is a data URL without data"))
            })?;
            let mime = meta.strip_suffix(";base64").ok_or_else(|| {
                ApiError::Unprocessable(format!(
                    "{what}: a data URL image must be base64 (`data:image/png;base64,...`)"
                ))
            })?;
            check_mime(mime, what)?;
            check_base64(payload, what, "image_url", max_bytes)?;
        } else if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ApiError::Unprocessable(format!(
                "{what}: `image_url` must be an http(s) or data: URL, not {:?}",
                crate::text::truncate(url, 60)
            )));
        }
    }
    if let Some(data) = &fields.image_base64 {
        check_mime(fields.image_mime.as_deref().unwrap_or("image/jpeg"), what)?;
        check_base64(data, what, "image_base64", max_bytes)?;
    }
    Ok(())
}

fn check_mime(mime: &str, what: &str) -> Result<(), ApiError> {
    if mime.starts_with("image/") && mime.len() > "image/".len() {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(format!(
            "{what}: the image's type must be image/..., not {:?}",
            crate::text::truncate(mime, 60)
        )))
    }
}

fn check_base64(data: &str, what: &str, field: &str, max_bytes: usize) -> Result<(), ApiError> {
    // Refuse by length before decoding anything large.
    let size = data.len() / 4 * 3;
    if size > max_bytes + 2 {
        return Err(too_large(what, size, max_bytes));
    }
    let bytes = STANDARD.decode(data.trim()).map_err(|e| {
        ApiError::Unprocessable(format!("{what}: `{field}` is not valid base64 ({e})"))
    })?;
    if bytes.len() > max_bytes {
        return Err(too_large(what, bytes.len(), max_bytes));
    }
    if bytes.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "{what}: `{field}` is empty"
        )));
    }
    Ok(())
}

fn too_large(what: &str, size: usize, max_bytes: usize) -> ApiError {
    ApiError::TooLarge(format!(
        "{what}: the image is {:.1} MiB, the limit is {:.1} MiB (`serve --max-image-mib`)",
        size as f64 / f64::from(1 << 20),
        max_bytes as f64 / f64::from(1 << 20)
    ))
}

/// A scan item from a multipart form: the `image` file part and text fields.
pub async fn item_from_multipart(mut form: Multipart, max_bytes: usize) -> Result<Value, ApiError> {
    let mut item = Map::new();
    let mut image = None;
    while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
        let name = field
            .name()
            .ok_or_else(|| ApiError::BadRequest("a form part has no name".into()))?
            .to_string();
        if name == "image" {
            let mime = field
                .content_type()
                .unwrap_or("application/octet-stream")
                .to_string();
            check_mime(&mime, "the scan")?;
            // Read in chunks, so an oversized image is refused once it passes the limit.
            let mut bytes = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                if bytes.len() + chunk.len() > max_bytes {
                    return Err(too_large("the scan", bytes.len() + chunk.len(), max_bytes));
                }
                bytes.extend_from_slice(&chunk);
            }
            if bytes.is_empty() {
                return Err(ApiError::Unprocessable(
                    "the scan: the `image` part is empty".into(),
                ));
            }
            image = Some((STANDARD.encode(&bytes), mime));
        } else {
            let text = field.text().await.map_err(multipart_error)?;
            item.insert(name, Value::String(text));
        }
    }
    let (data, mime) = image.ok_or_else(|| {
        ApiError::Unprocessable("a multipart scan needs a file part named `image`".into())
    })?;
    item.insert("image_base64".into(), Value::String(data));
    item.insert("image_mime".into(), Value::String(mime));
    Ok(Value::Object(item))
}

fn multipart_error(error: MultipartError) -> ApiError {
    match error.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("request body too large: {}", error.body_text()))
        }
        _ => ApiError::BadRequest(format!("malformed multipart form: {}", error.body_text())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(item: &str) -> Result<(), String> {
        check_item(item, "item 0", 16).map_err(|e| e.to_string())
    }

    #[test]
    fn image_fields_are_checked_when_present() {
        assert!(check(r#"{"text": "no image"}"#).is_ok());
        assert!(check(r#"[1, 2]"#).is_ok());
        assert!(check(r#"{"image_url": "https://x/a.jpg"}"#).is_ok());
        assert!(check(r#"{"image_url": "data:image/png;base64,cGV0"}"#).is_ok());
        assert!(check(r#"{"image_base64": "cGV0", "image_mime": "image/png"}"#).is_ok());

        let scheme = check(r#"{"image_url": "file:///etc/passwd"}"#).unwrap_err();
        assert!(
            scheme.contains("item 0: `image_url` must be an http(s)"),
            "{scheme}"
        );
        let base64 = check(r#"{"image_base64": "not base64!"}"#).unwrap_err();
        assert!(
            base64.contains("`image_base64` is not valid base64"),
            "{base64}"
        );
        let mime = check(r#"{"image_base64": "cGV0", "image_mime": "text/html"}"#).unwrap_err();
        assert!(mime.contains("must be image/..."), "{mime}");
        let big = STANDARD.encode([0u8; 17]);
        let large = check(&format!(r#"{{"image_base64": "{big}"}}"#)).unwrap_err();
        assert!(large.contains("the limit is 0.0 MiB"), "{large}");
        let plain = check(r#"{"image_url": "data:image/png,abc"}"#).unwrap_err();
        assert!(plain.contains("must be base64"), "{plain}");
    }
}
