// comigs android demo: `core` (plain Java 17 device logic, no Android imports) and `app` (the Android app).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "comigs-android-demo"
include(":core", ":app")
