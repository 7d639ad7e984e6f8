-- A QLM-style license database: the sample schema `qlm-bridge install --sample-schema` creates
-- when the tables are missing. Outside tools rely on these exact names. Apply with psql if you
-- want it without the bridge: psql -f sql/sample_schema.sql

CREATE TABLE IF NOT EXISTS customers (
    customer_id            bigserial PRIMARY KEY,
    full_name              text,
    email                  text,
    company                text,
    phone                  text,
    country                text,
    user_data              text,
    privacy_policy_consent boolean,
    created_at             timestamptz DEFAULT now(),
    updated_at             timestamptz
);

CREATE TABLE IF NOT EXISTS license_keys (
    activation_key           text PRIMARY KEY,
    customer_id              bigint REFERENCES customers ON DELETE SET NULL,
    product_id               int,
    product_name             text,
    major_version            int,
    minor_version            int,
    features                 text,
    license_model            text,
    num_licenses             int NOT NULL DEFAULT 1,
    available_licenses       int NOT NULL DEFAULT 1,
    activation_count         int NOT NULL DEFAULT 0,
    computer_id              text,
    computer_name            text,
    computer_key             text,
    activation_date          timestamptz,
    release_date             timestamptz,
    expiry_date              timestamptz,
    maintenance_renewal_date timestamptz,
    order_id                 text,
    order_date               timestamptz,
    subscription_id          text,
    user_data                text,
    comment                  text,
    created_at               timestamptz DEFAULT now(),
    last_accessed_date       timestamptz
);
