//! An order request as the client sends it, and its validation into a
//! [`ValidOrder`], collecting every problem rather than stopping at the first.

use messaging::contracts::{Lane, OrderLine};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;

/// Currencies orders can be placed in.
pub const CURRENCIES: [&str; 3] = ["EUR", "USD", "GBP"];
/// Most lines one order may have.
pub const MAX_LINES: usize = 100;

/// The pattern of a text someone typed: at least one visible character,
/// no control characters. The OpenAPI document gives it to each field in
/// [`VISIBLE_TEXT_FIELDS`] (`crate::openapi`): the schema attributes take
/// only a literal, so it is written once here rather than on each field.
pub const VISIBLE_TEXT_PATTERN: &str = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$";

/// The fields, by schema, whose text must be visible.
pub const VISIBLE_TEXT_FIELDS: [(&str, &str); 6] = [
    ("OrderRequest", "customer_id"),
    ("ItemRequest", "sku"),
    ("Shipping", "name"),
    ("Shipping", "address"),
    ("Shipping", "city"),
    ("Shipping", "postal_code"),
];

/// The body of `POST /orders`. Unknown fields are refused: a typo in an
/// optional field must not be silently ignored.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "customer_id": "c-42",
    "email": "ada@example.com",
    "items": [{"sku": "WIDGET", "quantity": 2}],
    "express": false
}))]
pub struct OrderRequest {
    /// The customer's own id: 1–64 characters, not only whitespace, no
    /// control characters. Surrounding whitespace is trimmed.
    #[schema(min_length = 1, max_length = 64)]
    pub customer_id: String,
    /// Where the confirmation goes: `local@domain`, the domain with a dot
    /// inside it, no whitespace or control characters, at most 254
    /// characters.
    #[schema(
        max_length = 254,
        pattern = r"^[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000@]+@[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000@.][^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000@]*\.[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000@]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000@.]$"
    )]
    pub email: String,
    /// 1–100 lines, each SKU once (compared trimmed and in upper case); SKUs
    /// must exist in the inventory (else `422 unknown_sku`).
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<ItemRequest>,
    /// EUR (the default), USD or GBP (lower case is accepted too).
    #[serde(default = "default_currency")]
    #[schema(default = "EUR", pattern = "^(EUR|USD|GBP)$")]
    pub currency: String,
    /// Take the express lane: processed ahead of standard orders.
    #[serde(default)]
    pub express: bool,
    /// An absolute http(s) URL to receive the order's events, at most 2048
    /// characters, without a user name or password; not one of orderflow's
    /// own services (their host names, or a loopback host, with their ports
    /// 8080–8085, 5432, 5672, 15672). The pattern is the canonical form
    /// (lower-case scheme and host name); any such URL the WHATWG URL
    /// standard parses is accepted.
    #[serde(default)]
    #[schema(
        format = "uri",
        max_length = 2048,
        pattern = r"^(?!https?://(?:[^/?#]*\.)?(?:localhost|order-api|order-processor|notification-service|logging-service|order-stats|payment-provider|rabbitmq|postgres):(?:808[0-5]|5432|5672)(?:[/?#]|$))https?://(?:(?!xn--)[a-z0-9-]+\.)*(?!xn--)[a-z][a-z0-9-]*(?::[0-9]{1,4})?(?:[/?](?:[-A-Za-z0-9._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*)?(?:#(?:[-A-Za-z0-9._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*)?$"
    )]
    pub callback_url: Option<String>,
    #[serde(default)]
    pub shipping: Option<Shipping>,
}

/// One requested line. The quantity is wide so that negative and huge values
/// get a clear validation message instead of a type error.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    /// 1–64 characters, not only whitespace, no control characters;
    /// trimmed and upper-cased before it is looked up.
    #[schema(min_length = 1, max_length = 64, example = "WIDGET")]
    pub sku: String,
    /// 1 to MAX_QUANTITY (1000 by default; `/openapi.json` states the
    /// server's own).
    #[schema(minimum = 1, maximum = 1000, example = 2)]
    #[serde(deserialize_with = "whole_number")]
    pub quantity: i64,
}

/// Where the order ships to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Shipping {
    /// 1–200 characters, not only whitespace, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// 1–500 characters, not only whitespace, no control characters.
    #[schema(min_length = 1, max_length = 500)]
    pub address: String,
    /// 1–200 characters, not only whitespace, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    pub city: String,
    /// 1–20 characters, not only whitespace, no control characters.
    #[schema(min_length = 1, max_length = 20)]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 in upper case, e.g. `DE` (the form is checked,
    /// not the list).
    #[schema(min_length = 2, max_length = 2, pattern = "^[A-Z]{2}$")]
    pub country: String,
}

/// JSON Schema's `integer` is any number without a fraction, `2.0` too, so
/// take those; past i64 it saturates and fails the range check instead.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(n) = number.as_i64() {
        return Ok(n);
    }
    if number.is_u64() {
        return Ok(i64::MAX);
    }
    match number.as_f64() {
        // `as` saturates at the i64 bounds.
        Some(f) if f.is_finite() && f.fract() == 0.0 => Ok(f as i64),
        _ => Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Other(&number.to_string()),
            &"a whole number",
        )),
    }
}

fn default_currency() -> String {
    "EUR".to_owned()
}

/// An order that passed every check; only [`OrderRequest::validate`] makes one.
#[derive(Debug, Clone)]
pub struct ValidOrder {
    pub customer_id: String,
    pub email: String,
    pub items: Vec<OrderLine>,
    pub currency: String,
    pub lane: Lane,
    pub callback_url: Option<String>,
    pub shipping: Option<Shipping>,
}

impl OrderRequest {
    /// Check every field; all problems are reported together.
    pub fn validate(self, max_quantity: i32) -> Result<ValidOrder, Vec<FieldError>> {
        let mut errors = Vec::new();
        let customer_id = self.customer_id.trim().to_owned();
        check_text(&mut errors, "customer_id", &customer_id, 64);
        let email = self.email.trim().to_owned();
        if !is_plausible_email(&email) {
            errors.push(FieldError::new(
                "email",
                "must be an email address like ada@example.com",
            ));
        }
        if self.items.is_empty() {
            errors.push(FieldError::new("items", "must contain at least one item"));
        } else if self.items.len() > MAX_LINES {
            errors.push(FieldError::new(
                "items",
                format!("must contain at most {MAX_LINES} items"),
            ));
        }
        let mut items: Vec<OrderLine> = Vec::with_capacity(self.items.len());
        for (i, item) in self.items.into_iter().enumerate() {
            // Measured as sent: upper-casing may lengthen it (`ß` is `SS`).
            let sku = item.sku.trim();
            check_text(&mut errors, &format!("items[{i}].sku"), sku, 64);
            let sku = sku.to_uppercase();
            if items.iter().any(|line| line.sku == sku) {
                errors.push(FieldError::new(
                    format!("items[{i}].sku"),
                    "appears more than once; put the total in one line",
                ));
            }
            let quantity = match i32::try_from(item.quantity) {
                Ok(q) if (1..=max_quantity).contains(&q) => q,
                _ => {
                    errors.push(FieldError::new(
                        format!("items[{i}].quantity"),
                        format!("must be between 1 and {max_quantity}"),
                    ));
                    0
                }
            };
            items.push(OrderLine { sku, quantity });
        }
        let currency = self.currency.trim().to_uppercase();
        if !CURRENCIES.contains(&currency.as_str()) {
            errors.push(FieldError::new(
                "currency",
                format!("must be one of {}", CURRENCIES.join(", ")),
            ));
        }
        if let Some(url) = &self.callback_url
            && let Err(message) = check_callback_url(url)
        {
            errors.push(FieldError::new("callback_url", message));
        }
        if let Some(shipping) = &self.shipping {
            check_text(&mut errors, "shipping.name", &shipping.name, 200);
            check_text(&mut errors, "shipping.address", &shipping.address, 500);
            check_text(&mut errors, "shipping.city", &shipping.city, 200);
            check_text(
                &mut errors,
                "shipping.postal_code",
                &shipping.postal_code,
                20,
            );
            let country = &shipping.country;
            if country.len() != 2 || !country.chars().all(|c| c.is_ascii_uppercase()) {
                errors.push(FieldError::new(
                    "shipping.country",
                    "must be a two-letter ISO country code like DE",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ValidOrder {
            customer_id,
            email,
            items,
            currency,
            lane: if self.express {
                Lane::Express
            } else {
                Lane::Standard
            },
            callback_url: self.callback_url,
            shipping: self.shipping,
        })
    }
}

fn check_text(errors: &mut Vec<FieldError>, field: &str, value: &str, max: usize) {
    if value.trim().is_empty() {
        errors.push(FieldError::new(field, "must not be empty"));
    } else if value.chars().count() > max {
        errors.push(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    } else if value.chars().any(char::is_control) {
        errors.push(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
}

fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    // Characters, as every length of the API (and JSON Schema) counts them.
    email.chars().count() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && !domain.contains('@')
}

/// The services' and their servers' host names (as in docker-compose.yml).
const SERVICE_HOSTS: [&str; 8] = [
    "order-api",
    "order-processor",
    "notification-service",
    "logging-service",
    "order-stats",
    "payment-provider",
    "rabbitmq",
    "postgres",
];
/// The ports they listen on: a loopback callback to one of these would have
/// a service call itself (or its broker or database).
const SERVICE_PORTS: [u16; 9] = [8080, 8081, 8082, 8083, 8084, 8085, 5432, 5672, 15672];

/// Whether a callback would make the services call themselves.
fn points_at_a_service(url: &url::Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if SERVICE_HOSTS.contains(&name.as_str()) {
                return true;
            }
            name == "localhost" || name.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || ip.is_unspecified(),
        None => false,
    };
    loopback
        && url
            .port_or_known_default()
            .is_some_and(|port| SERVICE_PORTS.contains(&port))
}

fn check_callback_url(raw: &str) -> Result<(), &'static str> {
    if raw.len() > 2048 {
        return Err("must be at most 2048 characters");
    }
    let url = url::Url::parse(raw).map_err(|_| "must be an absolute http(s) URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must use http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host");
    }
    // They would be sent as Basic auth, and logged with the URL.
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user name or password");
    }
    if points_at_a_service(&url) {
        return Err("must not point at orderflow's own services");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> OrderRequest {
        serde_json::from_value(serde_json::json!({
            "customer_id": "c-1", "email": "ada@example.com",
            "items": [{"sku": "widget", "quantity": 2}]
        }))
        .unwrap()
    }

    fn fields(result: Result<ValidOrder, Vec<FieldError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn callbacks_may_not_point_at_the_services_themselves() {
        for refused in [
            "http://order-api:8080/x",
            "http://RabbitMQ:15672/",
            "http://localhost:8082/healthz",
            "http://127.0.0.1:5432/",
            "http://[::1]:8080/orders",
            "http://0.0.0.0:8083/",
        ] {
            assert_eq!(
                check_callback_url(refused),
                Err("must not point at orderflow's own services"),
                "{refused}"
            );
        }
        for allowed in [
            "https://shop.example.com/hooks/orders",
            "http://127.0.0.1:9000/hook",
            "http://localhost:3000/",
        ] {
            assert_eq!(check_callback_url(allowed), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn callbacks_may_not_carry_credentials() {
        for refused in [
            "https://user:pw@shop.example.com/hooks",
            "https://token@shop.example.com/hooks",
            "http://:pw@shop.example.com/",
        ] {
            assert_eq!(
                check_callback_url(refused),
                Err("must not carry a user name or password"),
                "{refused}"
            );
        }
        let mut r = request();
        r.callback_url = Some("https://user:pw@shop.example.com/hooks".into());
        assert_eq!(fields(r.validate(1000)), ["callback_url"]);
    }

    #[test]
    fn a_minimal_order_is_valid_with_defaults() {
        let order = request().validate(1000).unwrap();
        assert_eq!(order.currency, "EUR");
        assert_eq!(order.lane, Lane::Standard);
        assert_eq!(order.items[0].sku, "WIDGET");
    }

    #[test]
    fn quantities_outside_the_range_are_rejected() {
        for quantity in [0, -1, 1001, i64::MAX] {
            let mut r = request();
            r.items[0].quantity = quantity;
            assert_eq!(
                fields(r.validate(1000)),
                ["items[0].quantity"],
                "{quantity}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut r = request();
        r.customer_id = " ".into();
        r.email = "nope".into();
        r.currency = "XXX".into();
        r.callback_url = Some("ftp://example.com/hook".into());
        assert_eq!(
            fields(r.validate(1000)),
            ["customer_id", "email", "currency", "callback_url"]
        );
    }

    #[test]
    fn empty_and_duplicate_items_are_rejected() {
        let mut r = request();
        r.items.clear();
        assert_eq!(fields(r.validate(1000)), ["items"]);
        let mut r = request();
        r.items.push(ItemRequest {
            sku: "WIDGET".into(),
            quantity: 1,
        });
        assert_eq!(fields(r.validate(1000)), ["items[1].sku"]);
    }

    #[test]
    fn whole_quantities_may_be_written_as_decimals() {
        let item = |quantity: &str| {
            serde_json::from_str::<ItemRequest>(&format!(
                r#"{{"sku": "W", "quantity": {quantity}}}"#
            ))
            .map(|item| item.quantity)
        };
        assert_eq!(item("85.0").unwrap(), 85);
        assert_eq!(item("1e2").unwrap(), 100);
        assert_eq!(item("18446744073709551615").unwrap(), i64::MAX);
        assert!(item("2.5").is_err());
        assert!(item("\"2\"").is_err());
    }

    #[test]
    fn lengths_are_counted_as_sent() {
        let mut r = request();
        r.items[0].sku = "ß".repeat(64);
        r.email = format!("{}@example.com", "é".repeat(200));
        assert!(r.validate(1000).is_ok());
    }

    #[test]
    fn plausible_emails() {
        assert!(is_plausible_email("a.b+c@example.co.uk"));
        for bad in ["", "a", "@x.y", "a@b", "a@.b", "a b@c.d", "a@b@c.d"] {
            assert!(!is_plausible_email(bad), "{bad}");
        }
    }
}
