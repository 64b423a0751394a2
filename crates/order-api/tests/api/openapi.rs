//! The OpenAPI description is served, says what the API does, and real
//! answers (errors included) match it: status declared, body valid against
//! the declared schema.

use serde_json::{Value, json};

use crate::helpers::{TestApp, order_body, spawn_app, spawn_with, test_settings};

async fn spec(app: &TestApp) -> Value {
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

/// Check one real answer against the spec's `method path` operation.
async fn conforms(spec: &Value, method: &str, path: &str, response: reqwest::Response) {
    let status = response.status().as_u16().to_string();
    let body: Value = response.json().await.unwrap();
    let declared = &spec["paths"][path][method]["responses"][&status];
    assert!(
        declared.is_object(),
        "{method} {path} answered {status}, which the spec does not declare: {body}"
    );
    let schema = &declared["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status} has no JSON schema"
    );
    // Validate with the whole document as the root, so `#/components/...`
    // references resolve.
    let mut root = json!({ "components": spec["components"].clone() });
    root["$ref"] = schema["$ref"].clone();
    let validator = validator_for(&root);
    let errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|error| format!("{} at {}", error, error.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match its schema: {errors:?}\n{body}"
    );
}

fn validator_for(root: &Value) -> jsonschema::Validator {
    jsonschema::draft202012::new(root).expect("the spec's schemas compile")
}

#[tokio::test]
async fn the_openapi_document_is_3_1_and_declares_every_error() {
    let app = spawn_app().await;
    let spec = spec(&app).await;

    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    let post = &spec["paths"]["/orders"]["post"]["responses"];
    for status in ["202", "400", "409", "413", "415", "422", "500", "503"] {
        assert!(post[status].is_object(), "POST /orders lacks {status}");
    }
    let get = &spec["paths"]["/orders/{id}"]["get"]["responses"];
    for status in ["200", "400", "404", "500", "503"] {
        assert!(get[status].is_object(), "GET /orders/{{id}} lacks {status}");
    }
    for (status, response) in post
        .as_object()
        .unwrap()
        .iter()
        .chain(get.as_object().unwrap())
    {
        if status.starts_with('4') || status.starts_with('5') {
            assert_eq!(
                response["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "error {status} must be documented with the error body"
            );
        }
    }
}

#[tokio::test]
async fn the_document_states_the_rules_the_server_enforces() {
    let (mut settings, pool) = test_settings().await;
    settings.max_quantity = 50;
    let app = spawn_with(settings, pool).await;
    let spec = spec(&app).await;
    let schemas = &spec["components"]["schemas"];

    let item = &schemas["ItemRequest"];
    assert_eq!(item["properties"]["quantity"]["minimum"], 1);
    assert_eq!(
        item["properties"]["quantity"]["maximum"], 50,
        "the configured MAX_QUANTITY"
    );
    assert_eq!(item["properties"]["sku"]["maxLength"], 64);
    let order = &schemas["OrderRequest"];
    assert_eq!(order["properties"]["items"]["minItems"], 1);
    assert_eq!(order["properties"]["items"]["maxItems"], 100);
    assert_eq!(order["properties"]["customer_id"]["maxLength"], 64);
    assert_eq!(order["properties"]["callback_url"]["format"], "uri");
    assert_eq!(
        schemas["Shipping"]["properties"]["country"]["pattern"],
        "^[A-Z]{2}$"
    );
    for name in ["OrderRequest", "ItemRequest", "Shipping"] {
        assert_eq!(
            schemas[name]["additionalProperties"], false,
            "{name} refuses unknown fields"
        );
    }
    let key = spec["paths"]["/orders"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .unwrap();
    assert_eq!(key["schema"]["pattern"], r"^[\x21-\x7E]{1,255}$");
    let id = &spec["paths"]["/orders/{id}"]["get"]["parameters"][0];
    assert_eq!(id["schema"]["format"], "uuid");
    assert_eq!(
        spec["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );

    // Every keyed operation declares what the key check, the rate limit,
    // the deadline and the database can answer.
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            assert!(operation["security"].is_array(), "{method} {path} is keyed");
            let responses = &operation["responses"];
            for status in ["401", "408", "429", "500", "503"] {
                assert!(
                    responses[status].is_object(),
                    "{method} {path} lacks {status}"
                );
            }
            assert!(responses["401"]["headers"]["WWW-Authenticate"].is_object());
            assert!(responses["429"]["headers"]["Retry-After"].is_object());
            for (status, response) in responses.as_object().unwrap() {
                assert!(
                    response["headers"]["X-Correlation-Id"].is_object(),
                    "{method} {path} {status} names the correlation id it echoes"
                );
            }
        }
    }
}

/// Orders the document calls valid, at the edges of every rule, are taken.
#[tokio::test]
async fn bodies_at_the_documented_limits_are_accepted() {
    let app = spawn_app().await;
    let items: Vec<Value> = (0..100)
        .map(|i| json!({"sku": if i == 0 { "WIDGET".to_owned() } else { format!("NO-SUCH-{i}") }, "quantity": 1000.0}))
        .collect();
    let body = json!({
        "customer_id": "ü".repeat(64),
        "email": format!("{}@example.com", "é".repeat(242)),
        "items": items,
        "callback_url": "https://shop.example.com/hooks/orders?x=1#top",
        "shipping": {"name": "N", "address": "A", "city": "C", "postal_code": "1".repeat(20), "country": "DE"}
    });
    let response = app.post_order(&body, Some(&"~".repeat(255))).await;
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap();
    // Every rule passed: what is left is the inventory, which is data.
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["code"], "unknown_sku", "{answer}");
    assert_eq!(
        answer["error"]["details"]["skus"].as_array().unwrap().len(),
        99
    );
}

#[tokio::test]
async fn real_answers_match_the_openapi_document() {
    let app = spawn_app().await;
    let spec = spec(&app).await;
    // The check itself can fail: an error body without its `error` object
    // does not pass as an error body.
    let error_body = json!({
        "components": spec["components"].clone(),
        "$ref": "#/components/schemas/ErrorBody"
    });
    assert!(!validator_for(&error_body).is_valid(&json!({"code": "x", "message": "y"})));

    let accepted = app.post_order(&order_body(), Some("contract-1")).await;
    let location = accepted.headers()["location"].to_str().unwrap().to_owned();
    conforms(&spec, "post", "/orders", accepted).await;
    conforms(&spec, "get", "/orders/{id}", app.get(&location).await).await;

    let mut invalid = order_body();
    invalid["items"][0]["quantity"] = json!(-1);
    conforms(
        &spec,
        "post",
        "/orders",
        app.post_order(&invalid, None).await,
    )
    .await;
    let mut unknown = order_body();
    unknown["items"][0]["sku"] = json!("NO-SUCH-SKU");
    conforms(
        &spec,
        "post",
        "/orders",
        app.post_order(&unknown, None).await,
    )
    .await;
    conforms(
        &spec,
        "post",
        "/orders",
        app.post_raw("{not json", Some("application/json")).await,
    )
    .await;
    conforms(
        &spec,
        "post",
        "/orders",
        app.post_raw("{}", Some("text/plain")).await,
    )
    .await;
    conforms(
        &spec,
        "post",
        "/orders",
        app.post_raw(r#"{"customer_id": 5}"#, Some("application/json"))
            .await,
    )
    .await;
    let mut changed = order_body();
    changed["email"] = json!("someone.else@example.com");
    conforms(
        &spec,
        "post",
        "/orders",
        app.post_order(&changed, Some("contract-1")).await,
    )
    .await;

    conforms(
        &spec,
        "get",
        "/orders/{id}",
        app.get("/orders/not-a-uuid").await,
    )
    .await;
    conforms(
        &spec,
        "get",
        "/orders/{id}",
        app.get("/orders/00000000-0000-0000-0000-000000000000")
            .await,
    )
    .await;
    let keyless = reqwest::get(format!("{}/orders/{}", app.address, uuid::Uuid::nil()))
        .await
        .unwrap();
    assert!(keyless.headers().contains_key("www-authenticate"));
    conforms(&spec, "get", "/orders/{id}", keyless).await;
}

#[tokio::test]
async fn the_docs_page_loads_the_document() {
    let app = spawn_app().await;
    let response = app.get("/docs").await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = response.text().await.unwrap();
    assert!(
        page.contains("orderflow order-api"),
        "the page embeds the document"
    );
}
